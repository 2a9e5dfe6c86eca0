"""The text tokenizer: a byte-level BPE trained on the training captions.

The paper (§2.2) BPE-encodes lower-cased captions with a 16,384-token vocabulary and pads them to 256
positions. Here the vocabulary is trained on our own caption worlds with `tokenizers` and wrapped as a
`transformers.PreTrainedTokenizerFast`, so it saves and loads like any Hugging Face tokenizer.
The padding token has id 0; the transformer swaps it for a learned padding token per text position.
"""

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"  # id 0: replaced by a per-position padding token inside the transformer (paper §2.2)
EOS_TOKEN = "<eos>"  # id 1: ends every caption; CLIP's text tower pools its hidden state here
UNK_TOKEN = "<unk>"  # id 2: byte-level BPE never needs it, but transformers expects one
# Not id 2 for EOS: transformers' CLIP text model treats `eos_token_id == 2` as a legacy checkpoint and
# pools at argmax(input_ids) instead of at the EOS token.


def train_text_tokenizer(
    captions: Iterable[str], vocab_size: int = 1024, text_seq_len: int = 16, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train a lower-casing byte-level BPE tokenizer on `captions`.

    Args:
        captions (`Iterable[str]`):
            Training captions.
        vocab_size (`int`, *optional*, defaults to 1024):
            Target vocabulary size, special tokens included. Small caption worlds need far fewer than the
            paper's 16,384; the BPE stops early when it runs out of merges.
        text_seq_len (`int`, *optional*, defaults to 16):
            Stored as `model_max_length`: captions are truncated and padded to this many tokens.
        min_frequency (`int`, *optional*, defaults to 2):
            A merge must occur this often to be learned.

    Returns:
        `PreTrainedTokenizerFast` with `pad_token="<pad>"` (id 0) and `eos_token="<eos>"` (id 1, appended to
        every caption), right padding and truncation.

    Example:

    ```python
    >>> from dalle_hf import train_text_tokenizer
    >>> tokenizer = train_text_tokenizer(["a red circle", "a blue square"] * 10, vocab_size=300, text_seq_len=8)
    >>> tokenizer("A red circle", padding="max_length", truncation=True)["input_ids"][:2] != [0, 0]
    True
    ```
    """
    if vocab_size < 259:
        raise ValueError(f"vocab_size must be at least 259 (256 bytes + 3 special tokens), got {vocab_size}")
    if text_seq_len < 1:
        raise ValueError(f"text_seq_len must be a positive int, got {text_seq_len}")
    tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    # Lower-case and normalize unicode so "Red" and "red" share tokens (paper §2.2 lower-cases captions).
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[PAD_TOKEN, EOS_TOKEN, UNK_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any byte sequence (emoji, CJK) stays encodable
        show_progress=False,
    )
    tokenizer.train_from_iterator(captions, trainer=trainer)
    # Append EOS after every caption; truncation keeps it (the template's special tokens are reserved).
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS_TOKEN}", pair=f"$A {EOS_TOKEN} $B {EOS_TOKEN}", special_tokens=[(EOS_TOKEN, eos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=text_seq_len,
        padding_side="right",
        truncation_side="right",
    )
