"""Teachers: models whose embeddings a student learns from (distillation), behind one registry.

``create_teacher("dlib")``, ``create_teacher("onnx", path=...)``, ``create_teacher("facerec",
path=...)``. Importing this package never imports dlib or onnxruntime: each adapter imports its
dependencies when it is built. :class:`TeacherCache` reads what ``facerec teach`` computed.
"""

from facerec.teachers.base import Teacher, create_teacher, list_teachers, register_teacher
from facerec.teachers.cache import TeacherCache, TeacherCacheError, content_hash, file_hash

# Importing the adapter modules registers them (their heavy imports happen on construction).
from facerec.teachers import dlib_teacher as _dlib  # noqa: E402,F401
from facerec.teachers import facerec_teacher as _facerec  # noqa: E402,F401
from facerec.teachers import onnx_teacher as _onnx  # noqa: E402,F401
from facerec.teachers.dlib_teacher import MissingExtraError  # noqa: E402

__all__ = [
    "MissingExtraError",
    "Teacher",
    "TeacherCache",
    "TeacherCacheError",
    "content_hash",
    "create_teacher",
    "file_hash",
    "list_teachers",
    "register_teacher",
]
