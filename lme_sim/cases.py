"""The one record every dataset loader produces: an :class:`EditCase`."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class EditCase:
    """One knowledge change: make ``prompt`` (which contains ``subject``) complete to ``target_new``.

    ``target_true`` is the object before the edit (None where a dataset has none).
    ``paraphrases`` are other phrasings of the same question (generalization probes);
    ``neighborhood`` are ``(prompt, answer)`` pairs about other subjects whose answer must not
    change (specificity / locality probes).
    """

    case_id: str
    subject: str
    prompt: str
    target_new: str
    target_true: str | None = None
    relation: str = ""
    paraphrases: tuple[str, ...] = ()
    neighborhood: tuple[tuple[str, str], ...] = ()
    source: str = ""
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.subject not in self.prompt:
            raise ValueError(
                f"case {self.case_id}: subject {self.subject!r} does not occur in prompt {self.prompt!r}"
            )

    def with_target(self, target_new: str, target_true: str | None) -> EditCase:
        """The same question edited toward another object (used for updates and reverts)."""
        from dataclasses import replace

        return replace(self, target_new=target_new, target_true=target_true)
