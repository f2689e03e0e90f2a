"""The pipeline's input errors: every way an input can be the caller's fault, each with a stable
``code`` that the service maps to a 4xx (``service.errors.from_exception``)."""

from __future__ import annotations


class PipelineError(Exception):
    """An input problem the caller can fix; ``code`` is stable, the message is for humans."""

    code = "pipeline_error"


class DecodeError(PipelineError):
    code = "decode_error"


class NoFaceError(PipelineError):
    code = "no_face"


class NotAlignedError(PipelineError):
    """An input declared aligned is not a crop of the model's input size."""

    code = "not_aligned"


class FaceIndexError(PipelineError):
    """A face was asked for by an index the image has no face for."""

    code = "face_index_out_of_range"

    def __init__(self, index: int, found: int) -> None:
        super().__init__(f"face index {index} asked for, {found} face(s) found (indexes 0-{found - 1}, "
                         "largest first as /v1/detect lists them)")
        self.index = index
        self.found = found


class TooManyFacesError(PipelineError):
    code = "too_many_faces"

    def __init__(self, found: int, limit: int) -> None:
        super().__init__(f"{found} faces found, more than the limit of {limit} per image")
        self.found = found
        self.limit = limit
