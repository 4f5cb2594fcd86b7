"""The in-memory search matrix of one model's templates, for 1:N search (exact up to PREFILTER_MIN templates,
prefiltered in a reduced space beyond)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Match:
    """Best and second-best subject for one query (subject_id None: nothing to match against)."""

    subject_id: str | None
    name: str
    score: float
    second_id: str | None
    second_score: float

    @property
    def margin(self) -> float:
        return self.score - self.second_score


PREFILTER_MIN = 20_000  # templates from which search prefilters in a reduced space
PREFILTER_DIM = 128
PREFILTER_K = 256


class GalleryMatrix:
    """Templates of one model as a (N, D) matrix, grouped by subject, for 1:N search.

    Up to PREFILTER_MIN templates every query is scored exactly against all.
    Beyond that a full scan is memory-bound (100k x 512 floats is 205 MB per
    query), so the templates are also kept projected on their top
    PREFILTER_DIM principal axes: the reduced scores pick PREFILTER_K
    candidate templates, which are then scored exactly. A subject that could
    matter for a decision (score near or above the threshold) scores far
    above the impostor crowd in the reduced space too, so it is always among
    the candidates; the scores reported are the exact ones.
    """

    def __init__(
        self,
        model_id: str,
        dim: int,
        subject_ids: list[str],
        names: list[str],
        embeddings: np.ndarray,
        owners: np.ndarray,
        revision: int,
        next_expiry: float | None = None,
        *,
        scope: frozenset[str] | None = None,
        as_of: float = 0.0,
        unreadable: dict[str, int] | None = None,
    ) -> None:
        self.model_id = model_id
        # Templates per subject that were read but did not open (kiosk.store.sealing): left out of the search,
        # reported by the verifier until they are mended (re-enrolled) or removed.
        self.unreadable = unreadable or {}
        self.next_expiry = next_expiry  # when the earliest subject in here expires: rebuild then
        self.scope = scope  # the subjects it was loaded for (None: everyone enrolled)
        self.as_of = as_of  # the time expiry was judged at
        self.dim = dim
        self.subject_ids = subject_ids
        self.names = names
        self.embeddings = np.ascontiguousarray(embeddings, np.float32)
        self.owners = owners  # (N,) subject index of each template, non-decreasing
        self.revision = revision
        self._starts = np.flatnonzero(np.r_[True, owners[1:] != owners[:-1]]) if len(owners) else owners
        self._basis: np.ndarray | None = None
        self._reduced: np.ndarray | None = None
        self._sorted_ids: np.ndarray | None = None  # subject_ids as an object array, when in code point order

    @classmethod
    def from_templates(
        cls, model_id: str, dim: int, templates: list[tuple[str, str, np.ndarray]], revision: int = -1
    ) -> GalleryMatrix:
        """A matrix from (subject id, name, embedding) tuples, e.g. the rows an import has added so far."""
        rows = sorted(templates, key=lambda t: t[0])
        ids: list[str] = []
        names: list[str] = []
        owners = np.empty(len(rows), np.int64)
        for i, (sid, name, _) in enumerate(rows):
            if not ids or ids[-1] != sid:
                ids.append(sid)
                names.append(name)
            owners[i] = len(ids) - 1
        emb = np.stack([t[2] for t in rows]).astype(np.float32) if rows else np.zeros((0, dim), np.float32)
        return cls(model_id, dim, ids, names, emb, owners, revision)

    def subset(self, subject_ids: set[str]) -> GalleryMatrix:
        """The templates of these subjects only (a flight's passengers), as a matrix of its own."""
        keep = np.array([sid in subject_ids for sid in self.subject_ids], bool)
        rows = keep[self.owners] if len(self.owners) else np.zeros(0, bool)
        index = np.cumsum(keep) - 1
        ids = [sid for sid, k in zip(self.subject_ids, keep, strict=True) if k]
        names = [n for n, k in zip(self.names, keep, strict=True) if k]
        return GalleryMatrix(
            self.model_id,
            self.dim,
            ids,
            names,
            self.embeddings[rows],
            index[self.owners[rows]],
            self.revision,
            self.next_expiry,
            unreadable={k: v for k, v in self.unreadable.items() if k in subject_ids},
        )

    @classmethod
    def from_rows(
        cls,
        model_id: str,
        dim: int,
        sids: np.ndarray,
        names: np.ndarray,
        embeddings: np.ndarray,
        revision: int,
        next_expiry: float | None = None,
        *,
        scope: frozenset[str] | None = None,
        as_of: float = 0.0,
        unreadable: dict[str, int] | None = None,
    ) -> GalleryMatrix:
        """A matrix from per-template subject ids and names (object arrays, sorted by subject id)."""
        first = np.r_[True, sids[1:] != sids[:-1]] if len(sids) else np.zeros(0, bool)
        out = cls(
            model_id,
            dim,
            [str(x) for x in sids[first]],
            [str(x) for x in names[first]],
            embeddings,
            np.cumsum(first) - 1,
            revision,
            next_expiry,
            scope=scope,
            as_of=as_of,
            unreadable=unreadable,
        )
        out._sorted_ids = sids[first]
        return out

    def patched(
        self,
        drop: set[str],
        sids: np.ndarray,
        names: np.ndarray,
        embeddings: np.ndarray,
        revision: int,
        next_expiry: float | None,
        *,
        scope: frozenset[str] | None,
        as_of: float,
        unreadable: dict[str, int] | None = None,
    ) -> GalleryMatrix:
        """This matrix without the subjects in `drop`, plus the templates given (per-template subject ids and
        names, sorted by subject id; none of a subject kept; `unreadable`: the dropped subjects' templates
        that did not open as read again): what a full load would give, for about the cost of copying the
        arrays. The search prefilter's axes are kept; only the new rows are projected on them."""
        unreadable = {**{k: v for k, v in self.unreadable.items() if k not in drop}, **(unreadable or {})}
        ids = self._sorted_ids
        if ids is None:  # not built sorted (from_rows): put it in order first
            order = np.argsort(np.array(self.subject_ids, object)[self.owners], kind="stable")
            return GalleryMatrix.from_rows(
                self.model_id,
                self.dim,
                np.array(self.subject_ids, object)[self.owners][order],
                np.array(self.names, object)[self.owners][order],
                self.embeddings[order],
                self.revision,
                self.next_expiry,
                scope=self.scope,
                as_of=self.as_of,
            ).patched(
                drop, sids, names, embeddings, revision, next_expiry, scope=scope, as_of=as_of, unreadable=unreadable
            )
        keep = np.ones(len(ids), bool)
        if drop and len(ids):
            gone = np.array(sorted(drop), object)
            at = np.minimum(np.searchsorted(ids, gone), len(ids) - 1)
            keep[at[ids[at] == gone]] = False
        rows = keep[self.owners] if len(self.owners) else np.zeros(0, bool)
        everyone = bool(rows.all())  # (the usual change, a newcomer: the big arrays are copied once, not twice)
        own = self.owners if everyone else self.owners[rows]
        kept_sids = ids[own]
        at = np.searchsorted(kept_sids, sids) if len(sids) else np.zeros(0, np.int64)  # where the new rows go
        new = np.asarray(embeddings, np.float32).reshape(-1, self.dim)
        out = GalleryMatrix.from_rows(
            self.model_id,
            self.dim,
            np.insert(kept_sids, at, sids),
            np.insert(np.array(self.names, object)[own], at, names),
            np.insert(self.embeddings if everyone else self.embeddings[rows], at, new, axis=0),
            revision,
            next_expiry,
            scope=scope,
            as_of=as_of,
            unreadable=unreadable,
        )
        if self._basis is not None and self._reduced is not None and len(out.embeddings) >= PREFILTER_MIN // 2:
            out._basis = self._basis
            out._reduced = np.insert(self._reduced if everyone else self._reduced[rows], at, new @ self._basis, axis=0)
        return out

    def prepare(self) -> GalleryMatrix:
        """Build the search prefilter of a large gallery now (about 1 s at 100k templates) rather than on
        the first search; a no-op for small galleries. Enrollment checks never need it."""
        if self._reduced is None and len(self.embeddings) >= PREFILTER_MIN:
            rng = np.random.default_rng(0)
            sample = self.embeddings[rng.choice(len(self.embeddings), min(20_000, len(self.embeddings)), replace=False)]
            _, _, vt = np.linalg.svd(sample, full_matrices=False)
            self._basis = np.ascontiguousarray(vt[:PREFILTER_DIM].T)  # (D, k)
            self._reduced = np.ascontiguousarray(self.embeddings @ self._basis)
        return self

    @property
    def prefiltered(self) -> bool:
        return self._reduced is not None

    @property
    def prefilter(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The prefilter's projection basis (D, k) and every template projected on it (N, k); None for a
        gallery searched in full. Read only: a patched matrix shares its source's basis."""
        if self._basis is None or self._reduced is None:
            return None
        return self._basis, self._reduced

    def __len__(self) -> int:
        return len(self.subject_ids)

    @property
    def template_count(self) -> int:
        return int(self.embeddings.shape[0])

    def subject_scores(self, queries: np.ndarray) -> np.ndarray:
        """(Q, S) best template score of each subject for each query (exact, full scan)."""
        q = np.asarray(queries, np.float32).reshape(-1, self.dim)
        if not len(self.subject_ids):
            return np.zeros((len(q), 0), np.float32)
        scores: np.ndarray = q @ self.embeddings.T
        if len(self._starts) == scores.shape[1]:  # one template per subject
            return scores
        return np.maximum.reduceat(scores, self._starts, axis=1)

    def _candidates(self, q: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query: (subject indices, exact best scores) of the prefiltered candidates."""
        if self._basis is None or self._reduced is None:
            raise RuntimeError("no prefilter below PREFILTER_MIN templates")
        approx = (q @ self._basis) @ self._reduced.T
        k = min(PREFILTER_K, approx.shape[1] - 1)
        out = []
        for row, query in zip(approx, q, strict=True):
            cand = np.argpartition(-row, k)[:k]
            exact = self.embeddings[cand] @ query
            owners = self.owners[cand]
            order = np.lexsort((-exact, owners))  # per subject, best template first
            first = np.r_[True, owners[order][1:] != owners[order][:-1]]
            out.append((owners[order][first], exact[order][first]))
        return out

    def search(self, queries: np.ndarray, *, only: str | None = None) -> list[Match]:
        """Best and second-best subject per query; `only` restricts to one subject (1:1)."""
        q = np.asarray(queries, np.float32).reshape(-1, self.dim)
        if only is not None:
            if only not in self.subject_ids:
                return [Match(None, "", -1.0, None, -1.0) for _ in q]
            j = self.subject_ids.index(only)
            rows = self.embeddings[self.owners == j]
            best = (q @ rows.T).max(axis=1)
            return [Match(only, self.names[j], float(b), None, -1.0) for b in best]
        if self.prepare().prefiltered:
            return [self._match(subjects, scores) for subjects, scores in self._candidates(q)]
        per_subject = self.subject_scores(q)
        index = np.arange(per_subject.shape[1])
        return [self._match(index, row) for row in per_subject]

    def _match(self, subjects: np.ndarray, scores: np.ndarray) -> Match:
        if scores.size == 0:
            return Match(None, "", -1.0, None, -1.0)
        if scores.size == 1:
            j = int(subjects[0])
            return Match(self.subject_ids[j], self.names[j], float(scores[0]), None, -1.0)
        top2 = np.argpartition(-scores, 1)[:2]
        b, s2 = top2 if scores[top2[0]] >= scores[top2[1]] else top2[::-1]
        jb, js = int(subjects[b]), int(subjects[s2])
        return Match(self.subject_ids[jb], self.names[jb], float(scores[b]), self.subject_ids[js], float(scores[s2]))
