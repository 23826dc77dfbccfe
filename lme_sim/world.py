"""A synthetic knowledge world: subjects, relations, objects, phrasings and dated changes.

Deterministic from :class:`WorldConfig` (its ``seed`` included). The world is what the embedded
default model is trained on (see :mod:`lme_sim.world_model`), so tests and the quickstart need
no download. Every subject is two words (a shared first name and a unique surname), every
object a single word, every relation has several phrasings: the first is the rewrite prompt,
the others are paraphrases.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import random
from dataclasses import asdict, dataclass
from functools import cached_property

from .cases import EditCase

# relation -> (phrasings, object kind). "{}" is the subject; the object follows the prompt.
# Every phrasing ends with the subject, so the model must recall a fact at the subject's last
# token (where ROME/MEMIT locate it): with words after the subject, a model this small learns to
# recall at the final position from raw subject tokens, and key-value editing has nothing to edit.
RELATIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "lives_in": (("The home town of {}", "The city of residence of {}", "The place where lives {}"), "city"),
    "works_as": (("The job of {}", "The profession of {}", "The occupation of {}"), "job"),
    "speaks": (("The language of {}", "The mother tongue of {}", "The language spoken by {}"), "language"),
    "plays": (("The sport of {}", "The favourite sport of {}", "The game played by {}"), "sport"),
    "owns": (("The pet of {}", "The animal owned by {}", "The companion animal of {}"), "pet"),
    "supports": (("The club of {}", "The team supported by {}", "The favourite club of {}"), "club"),
}
# Words that context prefixes and KL prompts use ("{} is a"); kept in every world's vocabulary.
COMMON_WORDS = ("The", "Therefore", "Because", "I", "You", "is", "a", "and", "of", ".", ",")

_ONSETS = (
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "kr",
    "st",
    "tr",
    "sh",
)
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou", "ei")
_CODAS = ("", "n", "r", "l", "s", "th", "k", "m")


@dataclass(frozen=True)
class WorldConfig:
    name: str = "default"
    seed: int = 0
    n_subjects: int = 250
    n_relations: int = 4
    n_objects: int = 24  # per relation
    n_first_names: int = 30
    n_histories: int = 60  # facts that change 2-4 times over simulated time
    start_date: str = "2024-01-01"
    days: int = 730

    def fingerprint(self) -> str:
        """Changes with the config and with the generator's own tables (relations, phrasings)."""
        spec = {"config": asdict(self), "relations": RELATIONS, "common": COMMON_WORDS}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


WORLDS: dict[str, WorldConfig] = {
    "default": WorldConfig(),
    "small": WorldConfig(
        name="small", seed=1, n_subjects=80, n_relations=3, n_objects=16, n_first_names=12, n_histories=20
    ),
}


def get_world_config(name: str) -> WorldConfig:
    if name not in WORLDS:
        raise ValueError(f"unknown world {name!r}; known worlds: {sorted(WORLDS)}")
    return WORLDS[name]


@dataclass(frozen=True)
class Fact:
    fact_id: int
    subject: str
    relation: str
    obj: str


@dataclass(frozen=True)
class Change:
    """From ``date`` on, ``fact`` has object ``new`` (it had ``old`` before)."""

    date: dt.date
    fact: Fact
    old: str
    new: str


class World:
    """The generated world. Build with ``World(get_world_config("small"))``."""

    def __init__(self, config: WorldConfig):
        self.config = config
        if config.n_relations > len(RELATIONS):
            raise ValueError(f"n_relations={config.n_relations} but only {len(RELATIONS)} relations exist")
        rng = random.Random(config.seed)
        words = _unique_words(
            rng, config.n_first_names + config.n_subjects + config.n_relations * config.n_objects
        )
        first, rest = words[: config.n_first_names], words[config.n_first_names :]
        surnames, rest = rest[: config.n_subjects], rest[config.n_subjects :]
        self.relations = list(RELATIONS)[: config.n_relations]
        self.objects = {
            rel: rest[i * config.n_objects : (i + 1) * config.n_objects]
            for i, rel in enumerate(self.relations)
        }
        self.subjects = [f"{rng.choice(first)} {s}" for s in surnames]
        self.facts = [
            Fact(i * len(self.relations) + j, subj, rel, rng.choice(self.objects[rel]))
            for i, subj in enumerate(self.subjects)
            for j, rel in enumerate(self.relations)
        ]
        self.changes = self._histories(rng)

    # --- text -----------------------------------------------------------------------------
    @staticmethod
    def templates(relation: str) -> tuple[str, ...]:
        return RELATIONS[relation][0]

    def prompt(self, fact: Fact, phrasing: int = 0) -> str:
        return self.templates(fact.relation)[phrasing].format(fact.subject)

    def sentences(self) -> list[tuple[str, str]]:
        """Every (prompt, object) pair the model is trained on: each fact in each phrasing."""
        return [
            (self.prompt(f, k), f.obj) for f in self.facts for k in range(len(self.templates(f.relation)))
        ]

    def corpus(self) -> list[str]:
        """Generic text of this world (for second-moment key statistics)."""
        return [f"{p} {o}" for p, o in self.sentences()]

    @cached_property
    def vocabulary(self) -> list[str]:
        words = set(COMMON_WORDS)
        for rel in self.relations:
            for t in self.templates(rel):
                words.update(t.replace("{}", " ").split())
            words.update(self.objects[rel])
        for s in self.subjects:
            words.update(s.split())
        return sorted(words)

    # --- edit cases -----------------------------------------------------------------------
    def case(
        self,
        fact: Fact,
        new: str,
        old: str | None = None,
        n_neighbors: int = 3,
        case_id: str | None = None,
        among: list[Fact] | None = None,
    ) -> EditCase:
        """An edit of ``fact`` to object ``new`` with paraphrase and neighborhood probes (neighbors
        drawn from ``among``, default every fact)."""
        templates = self.templates(fact.relation)
        neighbors = [
            f
            for f in (self.facts if among is None else among)
            if f.relation == fact.relation and f.subject != fact.subject and f.obj != new
        ]
        rng = random.Random(f"{self.config.seed}-{fact.fact_id}-{new}")
        same_obj = [f for f in neighbors if f.obj == (old or fact.obj)]
        chosen = (same_obj + rng.sample(neighbors, min(len(neighbors), n_neighbors)))[:n_neighbors]
        return EditCase(
            case_id=case_id or f"world-{fact.fact_id}-{new}",
            subject=fact.subject,
            prompt=templates[0].format(fact.subject),
            target_new=new,
            target_true=old if old is not None else fact.obj,
            relation=fact.relation,
            paraphrases=tuple(t.format(fact.subject) for t in templates[1:]),
            neighborhood=tuple((self.prompt(n), n.obj) for n in chosen),
            source=f"world:{self.config.name}",
            meta={"fact_id": fact.fact_id},
        )

    def split_facts(self, split: str | None) -> list[Fact]:
        """All facts (``None``), or those of one half of the subjects: ``"train"`` (odd subjects,
        for training learned editors) or ``"eval"`` (even subjects, held out from that training)."""
        if split is None:
            return self.facts
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train', 'eval' or None, not {split!r}")
        parity = 1 if split == "train" else 0
        return [f for f in self.facts if f.fact_id // len(self.relations) % 2 == parity]

    def edit_cases(self, n: int, seed: int = 0, split: str | None = None) -> list[EditCase]:
        """``n`` counterfactual edits of distinct facts, each toward another object of its relation
        (``split``: see :meth:`split_facts`)."""
        pool = self.split_facts(split)
        if n > len(pool):
            raise ValueError(
                f"world {self.config.name!r} has {len(pool)} facts"
                f"{'' if split is None else ' in its ' + split + ' split'}; asked for {n} edits"
            )
        rng = random.Random(seed)
        facts = rng.sample(pool, n)
        return [self.case(f, rng.choice([o for o in self.objects[f.relation] if o != f.obj])) for f in facts]

    def known_cases(self) -> list[EditCase]:
        """Every fact as a probe of unchanged knowledge (target_new == target_true == the object)."""
        return [
            self.case(f, f.obj, f.obj, n_neighbors=0, case_id=f"world-known-{f.fact_id}") for f in self.facts
        ]

    # --- dated change histories -----------------------------------------------------------
    def _histories(self, rng: random.Random) -> list[Change]:
        start = dt.date.fromisoformat(self.config.start_date)
        changes: list[Change] = []
        for fact in rng.sample(self.facts, min(self.config.n_histories, len(self.facts))):
            days = sorted(rng.sample(range(1, self.config.days), rng.randint(2, 4)))
            current = fact.obj
            for day in days:
                new = rng.choice([o for o in self.objects[fact.relation] if o != current])
                changes.append(Change(start + dt.timedelta(days=day), fact, current, new))
                current = new
        return sorted(changes, key=lambda c: (c.date, c.fact.fact_id))


def _unique_words(rng: random.Random, n: int) -> list[str]:
    """``n`` distinct capitalised pseudo-words of two or three syllables."""
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        word = "".join(
            rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
            for _ in range(rng.choice((2, 2, 3)))
        ).capitalize()
        if word not in seen and word not in COMMON_WORDS:
            seen.add(word)
            out.append(word)
    return out
