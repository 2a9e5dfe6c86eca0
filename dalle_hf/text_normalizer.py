"""Placeholder for dalle-mini's `TextNormalizer`: the `convert` branch delivers the real one under this name.

It passes text through unchanged, so that the DALL·E mini pipeline can be built and tested before the two branches
merge; at merge the `convert` branch's file replaces this one (same class, same `__call__` and `from_pretrained`).
"""


class DalleMiniTextNormalizer:
    """Identity stand-in for dalle-mini's text normalizer (ftfy, unidecode, emoji, lower-casing, clean-up)."""

    def __call__(self, text: str) -> str:
        return text

    @classmethod
    def from_pretrained(cls, directory: str | None = None) -> "DalleMiniTextNormalizer":
        """The normalizer for a tokenizer folder (the real one reads `enwiki-words-frequency.txt` from it)."""
        return cls()


__all__ = ["DalleMiniTextNormalizer"]
