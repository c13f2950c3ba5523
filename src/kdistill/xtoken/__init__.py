"""Cross-tokenizer distillation: align a teacher's and a student's tokens of the same text.

- ``TokenAligner``: encodes texts with both tokenizers and pairs the positions that end the same
  text prefix (``AlignedBatch``, ``TokenAlignment``); ``align_offsets`` does the same from
  offset tensors you already have.
- ``shared_vocabulary``: the one-to-one map between tokens of the two vocabularies that spell
  the same text (``Ġthe`` = ``▁the``), for ``kdistill.losses.cross_tokenizer.HybridULDLoss``.
- Offline tokenizers for tests and demos: ``byte_tokenizer``, ``train_bpe``,
  ``smollm2_tokenizer``.

Needs the ``tokenizers`` and ``transformers`` libraries: ``pip install "kdistill[hf]"``. This
package is never imported by ``kdistill`` itself.
"""

from .aligner import AlignedBatch as AlignedBatch
from .aligner import TokenAligner as TokenAligner
from .alignment import TokenAlignment as TokenAlignment
from .alignment import align_offsets as align_offsets
from .alignment import match_prefix_ends as match_prefix_ends
from .alignment import prefix_ends as prefix_ends
from .offline import byte_tokenizer as byte_tokenizer
from .offline import smollm2_tokenizer as smollm2_tokenizer
from .offline import train_bpe as train_bpe
from .vocab import SharedVocabulary as SharedVocabulary
from .vocab import shared_vocabulary as shared_vocabulary
from .vocab import token_spellings as token_spellings

__all__ = [
    "AlignedBatch",
    "SharedVocabulary",
    "TokenAligner",
    "TokenAlignment",
    "align_offsets",
    "byte_tokenizer",
    "match_prefix_ends",
    "prefix_ends",
    "shared_vocabulary",
    "smollm2_tokenizer",
    "token_spellings",
    "train_bpe",
]
