"""Galleries as the service uses them: contract pinning, the enrollment gate, open-set search.

:class:`GalleryManager` sits between the HTTP routes (which turn photos into
:class:`~facerec.gallery.policy.FaceEvidence`) and a :class:`~facerec.gallery.store.GalleryStore`.
It is synchronous and thread-safe; the routes call it from worker threads.

- A gallery records the contract id, embedding size and model of the model it was created with.
  Search and enrollment under another contract raise :class:`~facerec.contract.ContractMismatchError`
  (listing, renaming and deletion still work: they need no embeddings).
- The match threshold of a gallery: its fixed ``match_threshold`` when set, else the model's
  open-set calibration at the gallery's ``target_fpir`` for its current size. A request may pass
  its own ``threshold`` or ``fpir``. Every answer says which threshold it used and where it came from.
- Enrollment: every photo goes through the gate (:func:`~facerec.gallery.policy.assess`) and the
  duplicate check (its best match among *other* persons reaches the match threshold); accepted
  photos are stored together, refused ones are reported with their reasons. Check and insert hold
  a per-gallery lock, so two requests in this process cannot enroll the same face under two people.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from facerec.contract import ContractMismatchError, EmbeddingContract
from facerec.gallery.index import Candidate
from facerec.gallery.openset import OpenSetCalibration
from facerec.gallery.policy import (
    EnrollmentPolicy,
    FaceEvidence,
    Reason,
    Refusal,
    assess,
)
from facerec.gallery.store import (
    MAX_SAMPLES_PER_PERSON,
    GalleryRecord,
    GalleryStore,
    NewSample,
    PersonRecord,
)


class GalleryConfig(BaseModel):
    """Per-gallery settings, stored with the gallery."""

    model_config = ConfigDict(extra="forbid")

    policy: EnrollmentPolicy = Field(default_factory=EnrollmentPolicy)
    target_fpir: float = Field(
        0.01, gt=0.0, lt=1.0, description="false-positive identification rate the match threshold targets"
    )
    match_threshold: float | None = Field(
        None, ge=-1.0, le=1.0, description="a fixed cosine threshold instead of the calibrated one"
    )


class ThresholdRequired(ValueError):
    """No threshold can be chosen (no calibration, no fixed threshold, none in the request)."""


@dataclass
class Decision:
    threshold: float
    source: str  # model | gallery | request
    fpir: float | None
    calibrated_on: str | None = None
    gallery_size: int = 0
    calibrated_gallery_size: int | None = None
    beyond_calibration: bool = False
    calibration_method: str | None = None  # searches | pairs (see facerec.gallery.openset)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Offered:
    """One photo offered for enrollment: measured evidence, or why it could not be measured."""

    evidence: FaceEvidence | None = None
    refusals: list[Refusal] = field(default_factory=list)  # e.g. no_face, decided before the gate
    error: tuple[str, str] | None = None  # (code, message): the photo itself is unusable


@dataclass
class Outcome:
    status: str  # enrolled | refused | error
    refusals: list[Refusal] = field(default_factory=list)
    sample_id: str | None = None
    measurements: dict | None = None
    duplicate_of: dict | None = None
    error: tuple[str, str] | None = None


@dataclass
class Enrollment:
    person: PersonRecord | None
    created: bool
    outcomes: list[Outcome]

    @property
    def enrolled(self) -> int:
        return sum(o.status == "enrolled" for o in self.outcomes)


@dataclass
class SearchResult:
    candidates: list[Candidate]
    decision: Decision
    match: Candidate | None


class GalleryManager:
    def __init__(
        self, store: GalleryStore, contract: EmbeddingContract, calibration: OpenSetCalibration | None = None
    ) -> None:
        if calibration is not None and calibration.contract_id != contract.contract_id:
            raise ContractMismatchError(
                f"the open-set calibration was made for contract {calibration.contract_id}, the model "
                f"in use has {contract.contract_id}: run `facerec calibrate-openset` for this model"
            )
        self.store = store
        self.contract = contract
        self.calibration = calibration
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def _lock(self, gallery_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(gallery_id, threading.Lock())

    # ------------------------------------------------------------------ galleries
    def create(self, name: str, config: GalleryConfig | None = None) -> GalleryRecord:
        config = config or GalleryConfig()
        self._check_threshold_source(config)
        return self.store.create_gallery(
            name,
            self.contract.contract_id,
            self.contract.embedding_size,
            f"{self.contract.model_name} {self.contract.model_version}",
            config.model_dump(),
        )

    def _check_threshold_source(self, config: GalleryConfig) -> None:
        if config.match_threshold is None:
            if self.calibration is None:
                raise ThresholdRequired(
                    "the model has no open-set calibration (openset.json): give the gallery a "
                    "`match_threshold`, or run `facerec calibrate-openset` for this model"
                )
            self.calibration.fpir_key(config.target_fpir)  # ValueError lists the calibrated FPIRs

    def config(self, record: GalleryRecord) -> GalleryConfig:
        return GalleryConfig.model_validate(record.config)

    def update(self, gallery_id: str, name: str | None = None, config: GalleryConfig | None = None):
        if config is not None:
            self._check_threshold_source(config)
        return self.store.update_gallery(gallery_id, name, None if config is None else config.model_dump())

    def require_contract(self, record: GalleryRecord) -> None:
        if record.contract_id != self.contract.contract_id:
            raise ContractMismatchError(
                f"gallery {record.name!r} was built with model {record.model_name} (embedding contract "
                f"{record.contract_id}, {record.embedding_size}-d); the service runs "
                f"{self.contract.model_name} {self.contract.model_version} (contract "
                f"{self.contract.contract_id}). Embeddings of different models are not comparable: "
                "search and enroll with the gallery's model, or build a new gallery with this one"
            )

    # ------------------------------------------------------------------ thresholds
    def decision(
        self, record: GalleryRecord, fpir: float | None = None, threshold: float | None = None
    ) -> Decision:
        size = record.samples
        if threshold is not None:
            return Decision(float(threshold), "request", None, gallery_size=size)
        config = self.config(record)
        if fpir is None and config.match_threshold is not None:
            return Decision(config.match_threshold, "gallery", None, gallery_size=size)
        if self.calibration is None:
            raise ThresholdRequired(
                "the model has no open-set calibration: pass `threshold`, or set the gallery's "
                "`match_threshold`"
            )
        point = self.calibration.lookup(fpir if fpir is not None else config.target_fpir, max(1, size))
        return Decision(
            point.threshold,
            "model" if fpir is None else "request",
            point.fpir,
            point.calibrated_on,
            size,
            point.calibrated_gallery_size,
            point.beyond_calibration,
            point.calibration_method,
        )

    # ------------------------------------------------------------------ enrollment
    def enroll(
        self,
        gallery_id: str,
        offered: list[Offered],
        person_id: str | None = None,
        name: str | None = None,
        metadata: dict | None = None,
    ) -> Enrollment:
        """Gate every photo and store the accepted ones: for ``person_id``, or a new person
        ``name`` (created only when at least one photo is accepted)."""
        if not offered:
            raise ValueError("no images to enroll")
        with self._lock(gallery_id):
            record = self.store.get_gallery(gallery_id)
            self.require_contract(record)
            if person_id is not None:
                person = self.store.get_person(gallery_id, person_id)
                room = MAX_SAMPLES_PER_PERSON - person.samples
            else:
                person, room = None, MAX_SAMPLES_PER_PERSON
            if sum(o.evidence is not None for o in offered) > room:
                raise ValueError(f"a person holds at most {MAX_SAMPLES_PER_PERSON} samples; {room} more fit")
            config = self.config(record)
            threshold = self.decision(record).threshold if config.policy.reject_duplicates else None
            outcomes, accepted = [], []
            for item in offered:
                outcomes.append(self._gate(gallery_id, item, config.policy, threshold, person_id))
                if outcomes[-1].status == "enrolled":
                    accepted.append(item.evidence)
            if not accepted:
                return Enrollment(person, False, outcomes)
            samples = [NewSample(e.embedding, e.measurements()) for e in accepted]
            if person is None:
                person, records = self.store.create_person(gallery_id, name or "", metadata or {}, samples)
                created = True
            else:
                records = self.store.add_samples(gallery_id, person.id, samples)
                person = self.store.get_person(gallery_id, person.id)
                created = False
        ids = iter(r.id for r in records)
        for o in outcomes:
            if o.status == "enrolled":
                o.sample_id = next(ids)
        return Enrollment(person, created, outcomes)

    def _gate(
        self,
        gallery_id,
        item: Offered,
        policy: EnrollmentPolicy,
        threshold: float | None,
        person_id: str | None,
    ) -> Outcome:
        if item.error is not None:
            return Outcome("error", error=item.error)
        if item.evidence is None:
            return Outcome("refused", refusals=list(item.refusals))
        ev = item.evidence
        refusals = list(item.refusals) + assess(policy, ev)
        duplicate = None
        if threshold is not None:
            best = self.store.search(gallery_id, ev.embedding, 1, exclude_person=person_id)
            if best and best[0].similarity >= threshold:
                duplicate = {
                    "person_id": best[0].person_id,
                    "similarity": best[0].similarity,
                    "threshold": threshold,
                }
                refusals.append(
                    Refusal(
                        Reason.DUPLICATE_OF_OTHER_PERSON,
                        f"the face matches another enrolled person ({best[0].person_id}) "
                        f"with similarity {best[0].similarity:.3f} >= the gallery's match "
                        f"threshold {threshold:.3f}",
                    )
                )
        status = "refused" if refusals else "enrolled"
        return Outcome(status, refusals, measurements=ev.measurements(), duplicate_of=duplicate)

    # ------------------------------------------------------------------ search
    def search(
        self,
        gallery_id: str,
        embedding: np.ndarray,
        k: int = 5,
        fpir: float | None = None,
        threshold: float | None = None,
    ) -> SearchResult:
        record = self.store.get_gallery(gallery_id)
        self.require_contract(record)
        decision = self.decision(record, fpir, threshold)
        candidates = self.store.search(gallery_id, embedding, k) if record.samples else []
        match = candidates[0] if candidates and candidates[0].similarity >= decision.threshold else None
        return SearchResult(candidates, decision, match)
