"""dalle-mini's text normalizer (`dalle_mini/model/text.py`, Apache-2.0), which DALL·E mini and Mega saw every caption
through in training (`normalize_text: true` in their published configs).

The character-level work is done by the libraries dalle-mini uses, pinned: `ftfy.fix_text` (mojibake, odd unicode),
`html.unescape` (twice, as OpenAI's CLIP does), `emoji.demojize` (emoji to `:name:` before `unidecode` would drop
them), `unidecode` (to ASCII). dalle-mini's own caption rules follow as an ordered list of regular expressions
(`CLEANUP_STEPS`): they are its training-time behaviour, reproduced rule for rule, so the converted models see the
text they were trained on. Hashtags are split into words by dalle-mini's dynamic program (after wordninja) over the
English Wikipedia word ranks in `enwiki-words-frequency.txt`, a file of the published `dalle-mini/dalle-mini`
snapshot: it is read from the converted folder, never downloaded. Without it, a hashtag is kept as one word (and a
warning says so).

One deliberate difference: dalle-mini replaces CC12M's `<person>` tag with "a person", "someone" or "somebody" drawn
from Python's global `random`; here the draw uses the normalizer's own `random.Random(seed)`.
"""

import html
import logging
import math
import os
import random
import re

import emoji
import ftfy
from unidecode import unidecode

logger = logging.getLogger(__name__)

WORD_FREQUENCY_FILE = "enwiki-words-frequency.txt"
# dalle-mini's replacements for `<person>` and their Wikipedia counts (the draw's weights)
PERSON_WORDS = (("a person", 282265), ("someone", 121194), ("somebody", 12219))
_MARK = "xtokx"  # dalle-mini's placeholder: protects dots, quotes and slashes while punctuation becomes commas


def _sub(pattern: str, replacement):
    compiled = re.compile(pattern)
    return lambda text: compiled.sub(replacement, text)


def _remove_first_last_commas(text: str) -> str:
    text = text.strip()
    text = text[:-1] if text and text[-1] == "," else text
    text = text[1:] if text and text[0] == "," else text
    return text.strip()


# dalle-mini's `TextNormalizer.__call__` after `<person>` replacement, in its order; `None` marks the hashtag step.
CLEANUP_STEPS = (
    ("wiki references (WIT)", lambda t: re.sub(r"\[\d+\]\s*\Z", "", re.sub(r"\A\s*\[\d+\]", "", t))),
    ("html tags", _sub(r"<[^<]+?>", " ")),
    ("urls", _sub(r"http\S+", "")),
    ("commas in numbers", lambda t: re.sub(r"(\d),(\d{3})", r"\1\2", re.sub(r"(\d),(\d{3})", r"\1\2", t))),
    ("protect dots in numbers", _sub(r"(\w)\.(\w)", rf"\1{_MARK}dot{_MARK}\2")),
    ("protect 's 't 'd 'm 'll 're 've", _sub(r"'(?=([stdm]|(ll)|(re)|(ve)|(ll))\b)", rf"{_MARK}quote{_MARK}")),
    ("protect dates", _sub(r"(\d)/(\d)", rf"\1{_MARK}slash{_MARK}\2")),
    ("hyphen between words", _sub(r"(\w)-(\w)", r"\1 \2")),
    ("space around % & / $ *", _sub(r"([%&\/$*])", r" \1 ")),
    ("hashtags", None),
    ("ignored characters", _sub(r"[_#\\]", " ")),
    ("quotes", _sub(r"""['"`]""", ' " ')),
    ("punctuation to commas", _sub(r"[()[\].,|:;?!=+~\-\/{}]", ",")),
    ("restore dots", _sub(f"{_MARK}dot{_MARK}", ".")),
    ("restore quotes", _sub(f"{_MARK}quote{_MARK}", "'")),
    ("restore dates", _sub(f"{_MARK}slash{_MARK}", "/")),
    ("characters repeated 4+ times", _sub(r"(\D)(\1{3,})", r"\1")),
    ("merge quotes", _sub(r'(\s*"+\s*)+', ' " ')),
    ("merge commas", _sub(r"(\s*,+\s*)+", ", ")),
    ("extra spaces", _sub(r"\s+", " ")),
    ("first and last commas", _remove_first_last_commas),
)


class HashtagSplitter:
    """Splits run-together words (`sunsetvibes` -> `sunset vibes`) by the least total cost, a word of rank `r` in
    the frequency list costing `log(r + 1)` (dalle-mini's `HashtagProcessor`, after the wordninja library).

    Args:
        words (`list[str]`): words from the most to the least frequent.
    """

    _split_re = re.compile(r"[^a-zA-Z0-9']+")

    def __init__(self, words: list[str]):
        if not words:
            raise ValueError("expected a non-empty word list for the hashtag splitter")
        self.word_cost = {word: math.log(rank + 1) for rank, word in enumerate(words)}
        self.max_word = max(len(word) for word in self.word_cost)

    def __call__(self, text: str) -> str:
        return " ".join(word for part in self._split_re.split(text) for word in self.split(part))

    def _best_match(self, text: str, cost: list[float], i: int) -> tuple[float, int]:
        """(cost, length) of the cheapest last word of `text[:i]`; ties go to the shorter word, as in dalle-mini."""
        candidates = enumerate(reversed(cost[max(0, i - self.max_word):i]))
        return min((c + self.word_cost.get(text[i - k - 1:i].lower(), math.inf), k + 1) for k, c in candidates)

    def split(self, text: str) -> list[str]:
        cost = [0.0]
        for i in range(1, len(text) + 1):
            cost.append(self._best_match(text, cost, i)[0])
        words, i = [], len(text)
        while i > 0:  # backtrack; "'s" and runs of digits are glued back to the word they follow
            _, k = self._best_match(text, cost, i)
            piece = text[i - k:i]
            if piece != "'" and words and (words[-1] == "'s" or (text[i - 1].isdigit() and words[-1][0].isdigit())):
                words[-1] = piece + words[-1]
            else:
                words.append(piece)
            i -= k
        return words[::-1]


class DalleMiniTextNormalizer:
    """dalle-mini's caption normalizer: `normalizer("I ❤️ NY!")` -> `" i, red heart, ny"`.

    Args:
        words (`list[str]`, *optional*):
            The hashtag splitter's words, most frequent first (`enwiki-words-frequency.txt`); without them hashtags
            are kept whole.
        seed (`int`, *optional*):
            Seeds the draw that replaces `<person>` tags.

    Example:
        >>> normalizer = DalleMiniTextNormalizer()
        >>> normalizer("The Eiffel tower landing on the moon!")
        ' the eiffel tower landing on the moon'
    """

    def __init__(self, words: list[str] | None = None, seed: int | None = None):
        self.hashtags = HashtagSplitter(words) if words else None
        self.random = random.Random(seed)

    @classmethod
    def from_pretrained(cls, directory: str | None = None, seed: int | None = None) -> "DalleMiniTextNormalizer":
        """The normalizer for a folder holding `enwiki-words-frequency.txt` (a converted pipeline's `tokenizer/`, or a
        snapshot of `dalle-mini/dalle-mini`); read locally, never downloaded."""
        path = os.path.join(directory, WORD_FREQUENCY_FILE) if directory else None
        if path is None or not os.path.isfile(path):
            logger.warning("no %s in %s: hashtags are kept whole instead of split into words as dalle-mini does",
                           WORD_FREQUENCY_FILE, directory)  # fmt: skip
            return cls(seed=seed)
        with open(path, encoding="utf-8") as f:
            words = [line.split()[0] for line in f if line.strip()]
        return cls(words, seed=seed)

    def replace_person_tags(self, text: str) -> str:
        """CC12M's `<person>` tags: a run of them becomes "people", each other one a drawn word."""
        text = re.sub(r"<person>([,\s]*(and)*[,\s]*<person>)+", " people ", text)
        words, weights = zip(*PERSON_WORDS)
        while "<person>" in text:
            text = text.replace("<person>", f" {self.random.choices(words, weights)[0]} ", 1)
        return text

    def __call__(self, text: str) -> str:
        if not isinstance(text, str):
            raise ValueError(f"expected a prompt string, got {type(text).__name__}")
        text = ftfy.fix_text(text)
        text = html.unescape(html.unescape(text))
        text = emoji.demojize(text)  # before unidecode, which would drop them
        text = unidecode(text).lower()
        text = self.replace_person_tags(text)
        for _, step in CLEANUP_STEPS:
            if step is None:
                if self.hashtags is not None:
                    text = re.sub(r"#(\w+)", lambda m: self.hashtags(m.group(1)), text)
            else:
                text = step(text)
        return f" {text}"  # dalle-mini always starts with a space (BPE's word boundary)


__all__ = ["CLEANUP_STEPS", "DalleMiniTextNormalizer", "HashtagSplitter", "WORD_FREQUENCY_FILE"]
