"""General ability: small multiple-choice probe sets scored by log-likelihood.

Editing can damage what a model knows beyond the edited facts (Gu et al. 2024, "Model Editing Harms
General Abilities of Large Language Models", arXiv 2401.04700; AlphaEdit arXiv 2410.02355 sec. 4.3
tracks it over sequential edits). lme-sim measures it the lm-evaluation-harness way: every item is a
question with a few answer choices, the model's choice is the one with the highest mean per-token
log-probability given the question, and the metric is the accuracy over the set. All (question,
choice) pairs of a set are scored in batched passes (:func:`lme_sim.scoring.score_targets`).

Where the items come from:

* ``world:*`` models: facts of the synthetic world that the run does **not** edit, each as a
  4-way choice among objects of its relation (the rest of the model's knowledge);
* other models: a small built-in set of general-knowledge, arithmetic and common-sense items
  written for this project (:data:`BUILTIN_ITEMS`);
* a user file (``eval.general_ability.path``): JSON lines or a JSON list of
  ``{"question": ..., "choices": [...], "answer": <index or choice text>}``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .scoring import score_targets


@dataclass(frozen=True)
class MCItem:
    question: str
    choices: tuple[str, ...]
    answer: int  # index into choices


class ProbeSetError(ValueError):
    pass


def mc_predictions(model, tok, items: list[MCItem], batch_size: int = 64) -> torch.Tensor:
    """Index of the choice with the highest mean log-probability, per item (one batched scoring)."""
    prompts = [it.question for it in items for _ in it.choices]
    targets = [c for it in items for c in it.choices]
    lp = score_targets(model, tok, prompts, targets, batch_size).mean_logprob
    preds, at = [], 0
    for it in items:
        preds.append(int(lp[at : at + len(it.choices)].argmax()))
        at += len(it.choices)
    return torch.tensor(preds)


def mc_accuracy(model, tok, items: list[MCItem], batch_size: int = 64) -> float:
    """Fraction of items whose highest-scoring choice is the answer."""
    if not items:
        raise ProbeSetError("an empty multiple-choice probe set")
    preds = mc_predictions(model, tok, items, batch_size)
    return float((preds == torch.tensor([it.answer for it in items])).float().mean())


def world_items(
    world, exclude: set[tuple[str, str]], n: int, seed: int = 0, n_choices: int = 4
) -> list[MCItem]:
    """``n`` facts of ``world`` whose (subject, relation) is not in ``exclude``, as multiple choice
    among the true object and ``n_choices - 1`` other objects of the same relation."""
    rng = random.Random(seed)
    facts = [f for f in world.facts if (f.subject, f.relation) not in exclude]
    items = []
    for f in rng.sample(facts, min(n, len(facts))):
        others = rng.sample(
            [o for o in world.objects[f.relation] if o != f.obj],
            min(n_choices - 1, len(world.objects[f.relation]) - 1),
        )
        choices = others + [f.obj]
        rng.shuffle(choices)
        items.append(MCItem(world.prompt(f), tuple(choices), choices.index(f.obj)))
    return items


def load_items(path: str | Path) -> list[MCItem]:
    """Items from a JSON-lines file or a JSON list; errors name the file and the record."""
    path = Path(path)
    if not path.is_file():
        raise ProbeSetError(f"{path}: file not found")
    text = path.read_text()
    try:
        records = (
            json.loads(text)
            if text.lstrip().startswith("[")
            else [json.loads(line) for line in text.splitlines() if line.strip()]
        )
    except json.JSONDecodeError as e:
        raise ProbeSetError(f"{path}: not JSON or JSON lines: {e}") from None
    items = []
    for i, r in enumerate(records):
        try:
            q, choices, answer = r["question"], [str(c) for c in r["choices"]], r["answer"]
        except (KeyError, TypeError):
            raise ProbeSetError(f"{path}: record {i}: needs 'question', 'choices' and 'answer'") from None
        if len(choices) < 2:
            raise ProbeSetError(f"{path}: record {i}: needs at least 2 choices")
        if isinstance(answer, str):
            if answer not in choices:
                raise ProbeSetError(f"{path}: record {i}: answer {answer!r} is not one of its choices")
            answer = choices.index(answer)
        if not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise ProbeSetError(
                f"{path}: record {i}: answer must be a choice's index (0-{len(choices) - 1}) or text"
            )
        items.append(MCItem(str(q), tuple(choices), answer))
    if not items:
        raise ProbeSetError(f"{path}: no records")
    return items


def probe_items(
    n: int, path: str | None, world=None, exclude: set[tuple[str, str]] = frozenset(), seed: int = 0
) -> list[MCItem]:
    """The run's general-ability set: ``path`` if given, else the world's unedited facts (world
    models) or the built-in set; at most ``n`` items (a seeded sample)."""
    if path:
        items = load_items(path)
    elif world is not None:
        return world_items(world, set(exclude), n, seed)
    else:
        items = list(BUILTIN_ITEMS)
    return random.Random(seed).sample(items, n) if len(items) > n else items


def _items(rows: list[tuple[str, tuple[str, ...], int]]) -> tuple[MCItem, ...]:
    return tuple(MCItem(q, c, a) for q, c, a in rows)


# General knowledge, arithmetic and common sense, written for lme-sim (the answer is the index).
BUILTIN_ITEMS: tuple[MCItem, ...] = _items(
    [
        ("The capital of France is", ("Berlin", "Paris", "Madrid", "Rome"), 1),
        ("The capital of Japan is", ("Tokyo", "Seoul", "Beijing", "Bangkok"), 0),
        ("The capital of Italy is", ("Milan", "Naples", "Rome", "Venice"), 2),
        ("The capital of Germany is", ("Munich", "Hamburg", "Vienna", "Berlin"), 3),
        ("The capital of Egypt is", ("Cairo", "Nairobi", "Tunis", "Rabat"), 0),
        ("The capital of Canada is", ("Toronto", "Ottawa", "Vancouver", "Montreal"), 1),
        ("The largest planet in the solar system is", ("Mars", "Venus", "Jupiter", "Mercury"), 2),
        ("The planet closest to the Sun is", ("Mercury", "Saturn", "Neptune", "Uranus"), 0),
        ("Water freezes at a temperature of zero degrees", ("Fahrenheit", "Kelvin", "Celsius", "Rankine"), 2),
        ("The chemical symbol for gold is", ("Ag", "Au", "Fe", "Pb"), 1),
        ("The chemical formula of water is", ("CO2", "NaCl", "H2O", "O3"), 2),
        ("The gas that plants take in from the air is carbon", ("dioxide", "monoxide", "fiber", "paper"), 0),
        ("A week has seven", ("months", "years", "days", "hours"), 2),
        ("A year has twelve", ("weeks", "months", "days", "minutes"), 1),
        ("An hour has sixty", ("minutes", "days", "weeks", "years"), 0),
        ("Two plus two equals", ("three", "four", "five", "six"), 1),
        ("Ten minus three equals", ("seven", "six", "eight", "five"), 0),
        ("Three times three equals", ("six", "twelve", "nine", "eight"), 2),
        ("Half of ten is", ("two", "four", "three", "five"), 3),
        ("The opposite of hot is", ("cold", "warm", "red", "fast"), 0),
        ("The opposite of up is", ("left", "down", "over", "high"), 1),
        ("The opposite of night is", ("moon", "dark", "day", "star"), 2),
        ("The color of a clear daytime sky is", ("green", "blue", "red", "black"), 1),
        ("The color of fresh grass is", ("purple", "orange", "green", "white"), 2),
        ("Snow is usually the color", ("white", "black", "red", "brown"), 0),
        ("A baby cat is called a", ("puppy", "kitten", "calf", "foal"), 1),
        ("A baby dog is called a", ("puppy", "lamb", "chick", "cub"), 0),
        ("Bees make", ("milk", "silk", "honey", "wool"), 2),
        ("Cows give us", ("eggs", "honey", "wool", "milk"), 3),
        ("Fish live in", ("trees", "water", "deserts", "caves"), 1),
        ("Birds fly with their", ("wings", "fins", "roots", "wheels"), 0),
        ("We see with our", ("ears", "hands", "eyes", "feet"), 2),
        ("We hear with our", ("ears", "eyes", "knees", "teeth"), 0),
        ("The Sun rises in the", ("west", "north", "south", "east"), 3),
        ("The first month of the year is", ("March", "January", "June", "December"), 1),
        ("The day after Monday is", ("Sunday", "Friday", "Tuesday", "Thursday"), 2),
        ("Shakespeare wrote plays in the", ("Chinese", "Russian", "Arabic", "English"), 3),
        ("The Eiffel Tower is in the city of", ("London", "Paris", "Madrid", "Lisbon"), 1),
        ("The Great Wall is in", ("China", "Brazil", "Canada", "Kenya"), 0),
        ("The longest river in Africa is the", ("Amazon", "Danube", "Nile", "Thames"), 2),
        ("The currency of the United States is the", ("euro", "yen", "pound", "dollar"), 3),
        ("A triangle has three", ("sides", "wheels", "colors", "doors"), 0),
        ("A square has four equal", ("wheels", "sides", "names", "trees"), 1),
        ("Ice is frozen", ("sand", "water", "metal", "wood"), 1),
        ("The Moon orbits the", ("Sun", "Mars", "Earth", "Venus"), 2),
        ("Humans breathe in", ("oxygen", "helium", "neon", "argon"), 0),
        ("A doctor works in a", ("hospital", "bakery", "garage", "stadium"), 0),
        ("You read a", ("spoon", "book", "chair", "shoe"), 1),
    ]
)
