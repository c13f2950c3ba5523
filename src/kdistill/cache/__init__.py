"""Offline distillation: cache a teacher's outputs once, then train students without it.

``TeacherCache.build(teacher, dataloader, path)`` runs the teacher once and writes its outputs
(full tensors, or top-k log-probabilities for large vocabularies) to checksummed shards with a
manifest; ``CachedTeacher(path)`` replays them as a ``teacher_model`` for ``kdistill.convert``.
The on-disk format is documented in ``kdistill.cache._format``.
"""

from ._format import sample_input_hashes as sample_input_hashes
from ._format import teacher_fingerprint as teacher_fingerprint
from .store import TeacherCache as TeacherCache
from .teacher import CachedTeacher as CachedTeacher

__all__ = [
    "CachedTeacher",
    "TeacherCache",
    "sample_input_hashes",
    "teacher_fingerprint",
]
