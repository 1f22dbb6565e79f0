"""Adaptive retrieval (the MRL "funnel"): shortlist with a small prefix, re-rank at full width.

    index = FunnelIndex(corpus, dims=(32, None), shortlists=(200,))   # (N, E) array / tensor,
    scores, ids = index.search(queries, k=10)                          # or an encode_to_disk folder

Stage 0 searches every corpus row with FAISS on the re-normalised ``dims[0]``-prefix (flat inner
product by default; HNSW or IVF; float32, int8 = ScalarQuantizer QT_8bit, or binary = sign
bits under Hamming distance) and keeps ``shortlists[0]`` rows per query. Each later stage
re-scores the survivors exactly on its re-normalised prefix and keeps ``shortlists[i]``; the
last keeps ``k``. Only the stage-0 index lives in RAM. For an ``encode_to_disk`` folder the
chunks are memory-mapped to build stage 0 (prefix blocks, pages dropped from RSS after each
chunk), and the shortlisted full-width rows are read with ``pread`` in sorted id order (page
cache copies: touching a map would pull 16+ pages per row into the process's RSS).

Returned scores are always the exact cosine at ``dims[-1]`` (computed in float64, returned as
float32), whatever stage 0 approximated; rows are ordered by that score, then by id (lower
first), so ties are deterministic. Re-rank stages select their survivors on float32 cosines
(float32 rounding, as in any float32 brute-force search, decides only near-exact ties). A shortlist of at least N keeps every row (stage 0 is skipped),
so such a funnel is exact; ``dims=(None,)`` is plain exact search.

This module does not import torch (a CUDA build of torch costs ~0.7 GB of RSS at import):
tensors are accepted and returned as tensors, with torch imported only then.
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

FIRST_STAGES = ("flat", "hnsw", "ivf")
PRECISIONS = ("float32", "int8", "binary")
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}
_BLOCK = 65_536  # rows per block when building stage 0 (bounds the float32 prefix copy)


# -- corpus sources ----------------------------------------------------------------------------
class _Rows:
    """The full-width corpus as (start, array) chunks; arrays may be memory maps of files."""

    def __init__(self, chunks: list[tuple[int, np.ndarray]], maps: list[mmap.mmap],
                 files: list[tuple[int, int]] | None = None):
        self.chunks, self.maps = chunks, maps
        self.files = files  # (file descriptor, data offset) per chunk: gather with pread
        self.fds = [fd for fd, _ in files or ()]
        self.starts = np.array([s for s, _ in chunks], dtype=np.int64)
        self.n = sum(len(a) for _, a in chunks)
        self.width = chunks[0][1].shape[1] if chunks else 0

    def gather(self, ids: np.ndarray) -> np.ndarray:
        """float32 rows for ids (any order; sorted ids read the files sequentially)."""
        if len(self.chunks) == 1 and self.files is None:
            return np.asarray(self.chunks[0][1][ids], dtype=np.float32)
        out = np.empty((len(ids), self.width), dtype=np.float32)
        where = np.searchsorted(self.starts, ids, side="right") - 1
        for c in np.unique(where):
            start, array = self.chunks[c]
            sel = where == c
            out[sel] = array[ids[sel] - start] if self.files is None else self._pread(c, ids[sel] - start)
        return out

    def _pread(self, c: int, rows: np.ndarray) -> np.ndarray:
        """Rows of chunk c read with pread: page-cache copies that never count in this
        process's RSS, unlike touching a memory map (Linux maps 16+ pages around each fault)."""
        fd, offset = self.files[c]
        array = self.chunks[c][1]
        size = array.shape[1] * array.itemsize
        out = np.empty((len(rows), array.shape[1]), dtype=array.dtype)
        views = [memoryview(row) for row in out.view(np.uint8)]  # each row's bytes, read in place
        preadv = os.preadv
        for view, at in zip(views, (offset + rows * size).tolist(), strict=True):
            preadv(fd, [view], at)
        return out

    def release(self) -> None:
        """Drop mapped pages from this process's RSS (they stay in the OS page cache)."""
        for m in self.maps:
            m.madvise(mmap.MADV_DONTNEED)

    def __del__(self) -> None:
        for fd in self.fds:
            os.close(fd)


def _map_array(path: Path, offset: int, dtype: np.dtype, shape: tuple[int, int],
               maps: list[mmap.mmap]) -> np.ndarray:
    """A read-only view of `shape` rows at byte `offset` of `path`, through mmap."""
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    maps.append(m)
    count = shape[0] * shape[1]
    return np.frombuffer(m, dtype=dtype, count=count, offset=offset).reshape(shape)


def _npy_header(path: Path) -> tuple[int, np.dtype, tuple[int, ...]]:
    header = np.load(path, mmap_mode="r")  # reads the header only; numpy knows the data offset
    offset, dtype, shape = header.offset, header.dtype, header.shape
    if not header.flags.c_contiguous:
        raise ValueError(f"{path} is Fortran-ordered; write it C-ordered (np.save of a C array)")
    del header
    return offset, dtype, shape


def _safetensors_header(path: Path, name: str = "embeddings") -> tuple[int, np.dtype, tuple[int, ...]]:
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    if name not in header or header[name]["dtype"] not in _ST_DTYPES:
        raise ValueError(f"{path} has no float tensor {name!r}: is it an encode_to_disk chunk?")
    entry = header[name]
    return 8 + size + entry["data_offsets"][0], np.dtype(_ST_DTYPES[entry["dtype"]]), tuple(entry["shape"])


def _folder_rows(folder: Path) -> _Rows:
    """Memory-map every chunk of an `encode_to_disk` folder (index.json + .npy/.safetensors)."""
    path = folder / "index.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass an (N, E) array or an encode_to_disk folder")
    index = json.loads(path.read_text())
    if not index.get("complete"):
        raise ValueError(f"{folder} is incomplete (interrupted?): run encode_to_disk again to finish it")
    chunks: list[tuple[int, np.ndarray]] = []
    maps: list[mmap.mmap] = []
    files: list[tuple[int, int]] = []
    for chunk in index["chunks"]:
        file = folder / chunk["file"]
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing: run encode_to_disk again to write it")
        reader = _npy_header if file.suffix == ".npy" else _safetensors_header
        offset, dtype, shape = reader(file)
        if shape != (chunk["count"], index["dim"]):
            raise ValueError(f"{file} holds {shape}, index.json says ({chunk['count']}, {index['dim']}): "
                             "delete it and run encode_to_disk again")
        chunks.append((chunk["start"], _map_array(file, offset, dtype, shape, maps)))
        files.append((os.open(file, os.O_RDONLY), offset))
    return _Rows(chunks, maps, files)


def _is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def _as_numpy(x: Any, what: str) -> np.ndarray:
    """A 2-D float numpy view of an array or tensor (no copy for CPU float32 data)."""
    if _is_torch(x):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{what} must be a 2-D float array (rows, dim), got shape {x.shape} "
                         f"and dtype {x.dtype}")
    return x


def _normalised(x: np.ndarray, what: str, first_row: int = 0) -> np.ndarray:
    """Rows of `x` scaled to unit L2 norm; a non-finite value or a zero row is an error."""
    if not np.isfinite(x).all():
        bad = first_row + int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
        raise ValueError(f"{what} row {bad} is not finite (NaN or inf): fix or drop that row")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        bad = first_row + int(np.flatnonzero(norms[:, 0] == 0)[0])
        raise ValueError(f"{what} row {bad} is all zeros at width {x.shape[1]}: its cosine is "
                         "undefined; drop that row")
    return x / norms


# -- the index ---------------------------------------------------------------------------------
class FunnelIndex:
    """Shortlist with FAISS on a small prefix, then re-rank the shortlist exactly on larger ones."""

    def __init__(self, embeddings: Any, dims: Sequence[int | None] = (64, None),
                 shortlists: Sequence[int] = (200,), first_stage: str = "flat",
                 precision: str = "float32", *, hnsw_m: int = 32, ef_search: int = 64,
                 ef_construction: int = 80, nlist: int | None = None, nprobe: int = 16,
                 train_size: int = 100_000, seed: int = 0, reads: str = "pread"):
        """`embeddings`: an (N, E) array/tensor or an `encode_to_disk` folder. `dims`: ascending
        prefix sizes (None = E), one per stage; `shortlists`: rows kept after each stage but
        the last. HNSW: `hnsw_m`, `ef_search` (raised to the shortlist when smaller),
        `ef_construction`; IVF: `nlist` (default ~4 sqrt(N)), `nprobe`; `train_size` rows
        (seeded sample) train IVF / int8. `reads` (folders): "pread" re-ranks from page-cache
        copies (RSS stays bounded), "mmap" from the memory map (faster; its pages count in
        RSS, up to the whole corpus)."""
        if reads not in ("pread", "mmap"):
            raise ValueError(f"reads must be 'pread' or 'mmap', got {reads!r}")
        if isinstance(embeddings, (str, os.PathLike)):
            self.source = Path(embeddings)
            self.rows = _folder_rows(self.source)
            if reads == "mmap":
                self.rows.files = None
        else:
            self.source = None
            self.rows = _Rows([(0, _as_numpy(embeddings, "embeddings"))], [])
        self.n, self.width = self.rows.n, self.rows.width
        if self.n == 0 or self.width == 0:
            raise ValueError(f"embeddings are empty ({self.n} rows of width {self.width}): "
                             "index at least one vector")
        self.dims = _check_dims(dims, self.width)
        self.shortlists = _check_shortlists(shortlists, len(self.dims))
        if first_stage not in FIRST_STAGES:
            raise ValueError(f"first_stage must be one of {FIRST_STAGES}, got {first_stage!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        d0 = self.dims[0]
        if precision == "binary" and d0 % 8:
            raise ValueError(f"binary codes need dims[0] to be a multiple of 8, got {d0}")
        for name, value in (("hnsw_m", hnsw_m), ("ef_search", ef_search),
                            ("ef_construction", ef_construction), ("nprobe", nprobe),
                            ("train_size", train_size)):
            _check_positive(value, name)
        if nlist is not None:
            _check_positive(nlist, "nlist")
        self.first_stage, self.precision = first_stage, precision
        self.ef_search, self.nprobe = ef_search, nprobe
        self.nlist = nlist or max(1, min(int(4 * self.n ** 0.5), self.n // 39))
        self.index = self._build(hnsw_m, ef_construction, train_size, seed)

    # -- building ------------------------------------------------------------------------------
    def _prefix_blocks(self, d: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, normalised float32 d-prefix) blocks of the whole corpus, in order."""
        for start, array in self.rows.chunks:
            for lo in range(0, len(array), _BLOCK):
                block = np.asarray(array[lo:lo + _BLOCK, :d], dtype=np.float32)
                yield start + lo, _normalised(block, "embeddings", start + lo).astype(np.float32)
            self.rows.release()  # a whole chunk was read

    def _codes(self, x: np.ndarray) -> np.ndarray:
        return np.packbits(x > 0, axis=1) if self.precision == "binary" else x

    def _build(self, hnsw_m: int, ef_construction: int, train_size: int, seed: int) -> Any:
        import faiss

        d, ip = self.dims[0], faiss.METRIC_INNER_PRODUCT
        if self.shortlists and self.shortlists[0] >= self.n:
            return None  # every row survives stage 0: nothing to search
        if self.precision == "binary":
            index = {"flat": lambda: faiss.IndexBinaryFlat(d),
                     "hnsw": lambda: faiss.IndexBinaryHNSW(d, hnsw_m),
                     "ivf": lambda: faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(d), d, self.nlist)}
        elif self.precision == "int8":
            sq = faiss.ScalarQuantizer.QT_8bit
            index = {"flat": lambda: faiss.IndexScalarQuantizer(d, sq, ip),
                     "hnsw": lambda: faiss.IndexHNSWSQ(d, sq, hnsw_m, ip),
                     "ivf": lambda: faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(d), d,
                                                                   self.nlist, sq, ip)}
        else:
            index = {"flat": lambda: faiss.IndexFlatIP(d),
                     "hnsw": lambda: faiss.IndexHNSWFlat(d, hnsw_m, ip),
                     "ivf": lambda: faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, self.nlist, ip)}
        index = index[self.first_stage]()
        if self.first_stage == "hnsw":
            index.hnsw.efConstruction = ef_construction
        if not index.is_trained:
            rng = np.random.default_rng(seed)
            sample = np.sort(rng.choice(self.n, size=min(train_size, self.n), replace=False))
            train = _normalised(self.rows.gather(sample)[:, :d], "embeddings").astype(np.float32)
            self.rows.release()
            index.train(self._codes(train))
        for _, block in self._prefix_blocks(d):
            index.add(self._codes(block))
        return index

    # -- searching -----------------------------------------------------------------------------
    def search(self, queries: Any, k: int = 10, batch_size: int = 256) -> tuple[Any, Any]:
        """(scores, ids), both (Q, k): the k nearest rows by cosine at dims[-1], best first
        (ties: lower id first). Tensors in → tensors out; arrays in → arrays out."""
        torch_in = _is_torch(queries)
        q = _as_numpy(queries, "queries")
        if q.shape[1] != self.width:
            raise ValueError(f"queries have width {q.shape[1]} but the index holds width "
                             f"{self.width}: embed queries with the same model at full width")
        _check_positive(k, "k")
        _check_positive(batch_size, "batch_size")
        if k > self.n:
            raise ValueError(f"k={k} exceeds the {self.n} indexed rows: ask for at most {self.n}")
        small = [s for s in self.shortlists if s < k]
        if small:
            raise ValueError(f"shortlists {self.shortlists} must each be >= k={k} (a stage cannot "
                             "keep fewer rows than are returned): raise them or lower k")
        for d in self.dims:  # every stage's prefix must be usable, checked before any work
            _normalised(q[:, :d].astype(np.float64), "queries")
        scores = np.empty((len(q), k), dtype=np.float32)
        ids = np.empty((len(q), k), dtype=np.int64)
        keeps = [*self.shortlists, k]
        widest = min(keeps[0], self.n)
        # Re-rank in sub-batches whose gathered float32 rows stay ~32 MB, whatever the shortlist.
        sub = max(1, 2 ** 23 // (widest * self.width))
        for lo in range(0, len(q), batch_size):
            qb = q[lo:lo + batch_size]
            cand = self._first_stage(qb, widest)
            for j in range(0, len(qb), sub):
                part = slice(lo + j, lo + min(j + sub, len(qb)))
                scores[part], ids[part] = self._rerank(qb[j:j + sub], cand[j:j + sub], keeps)
        if torch_in:
            import torch
            return torch.from_numpy(scores), torch.from_numpy(ids)
        return scores, ids

    def _first_stage(self, q: np.ndarray, keep: int) -> np.ndarray:
        """(b, keep) candidate ids from stage 0 (-1 where the index found fewer)."""
        if self.index is None:
            return np.broadcast_to(np.arange(self.n, dtype=np.int64), (len(q), self.n))
        d = self.dims[0]
        x = _normalised(q[:, :d].astype(np.float64), "queries").astype(np.float32)
        if self.first_stage == "hnsw":
            self.index.hnsw.efSearch = max(self.ef_search, keep)
        elif self.first_stage == "ivf":
            self.index.nprobe = min(self.nprobe, self.nlist)
        _, found = self.index.search(self._codes(x), keep)
        return found.astype(np.int64)

    def _rerank(self, q: np.ndarray, cand: np.ndarray, keeps: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Exact stages on the candidates: (b, k) cosines at dims[-1] (float32) and ids."""
        big = np.iinfo(np.int64).max
        # Each query's candidates in id order (-1 = none found → last): sequential reads of the
        # map, and a stable sort by score then breaks ties by lower id.
        ids = np.sort(np.where(cand >= 0, cand, big), axis=1)
        valid = ids != big
        rows = self.rows.gather(np.where(valid, ids, 0).reshape(-1)).reshape(*ids.shape, self.width)
        # A single-stage index re-scores its own top k at dims[0]; the last stage's top k are
        # then re-scored in float64 below (float32 here: the shortlist is the bulk of the work).
        stages = list(zip(self.dims[1:], keeps[1:], strict=True)) or [(self.dims[0], keeps[0])]
        for n, (d, keep) in enumerate(stages):
            s = self._cosines(q, rows, ids, valid, d, np.float32)
            order = np.sort(np.argsort(-s, axis=1, kind="stable")[:, :keep], axis=1)  # back to id order
            ids, valid = np.take_along_axis(ids, order, 1), np.take_along_axis(valid, order, 1)
            if n + 1 < len(stages) or keep < rows.shape[1]:
                rows = np.take_along_axis(rows, order[..., None], 1)
        if not valid.all():
            raise ValueError(f"stage 0 ({self.first_stage}) found fewer than k={keeps[-1]} rows for "
                             "some queries: raise nprobe / ef_search or the first shortlist")
        # Returned scores: float64 cosines rounded to float32; equal scores → lower id first.
        s = self._cosines(q, rows, ids, valid, stages[-1][0], np.float64).astype(np.float32)
        order = np.argsort(-s, axis=1, kind="stable")
        return np.take_along_axis(s, order, 1), np.take_along_axis(ids, order, 1)

    @staticmethod
    def _cosines(q: np.ndarray, rows: np.ndarray, ids: np.ndarray, valid: np.ndarray, d: int,
                 dtype: type) -> np.ndarray:
        """(b, s) cosines of each query with its rows at prefix d (-inf where not valid)."""
        qd = _normalised(q[:, :d].astype(np.float64), "queries").astype(dtype)
        rd = rows[..., :d].astype(dtype, copy=False)
        norms = np.sqrt(np.einsum("bsd,bsd->bs", rd, rd))
        s = np.einsum("bsd,bd->bs", rd, qd)
        bad = valid & ~((norms > 0) & np.isfinite(s))
        if bad.any():
            row = int(ids[bad][0])
            raise ValueError(f"embeddings row {row} is all zeros or not finite at width {d}: "
                             "drop or fix that row")
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(valid, s / norms, -np.inf)

    # -- cost ----------------------------------------------------------------------------------
    def memory_bytes(self) -> int:
        """Bytes of the in-RAM stage-0 index (codes, plus HNSW links / IVF centroids and ids)."""
        if self.index is None:
            return 0
        per_row = {"float32": 4 * self.dims[0], "int8": self.dims[0], "binary": self.dims[0] // 8}
        extra = 0
        if self.first_stage == "hnsw":
            extra = self.index.hnsw.neighbors.size() * 4
        elif self.first_stage == "ivf":
            extra = self.nlist * self.dims[0] * 4 + self.n * 8
        return self.n * per_row[self.precision] + extra

    def cost(self, k: int = 10) -> dict[str, float]:
        """Modelled per-query work with a flat stage 0 (IVF / HNSW savings are measured, not
        modelled): flops (2 per multiply-add), bytes read, and the stage-0 index bytes."""
        keeps = [*self.shortlists, k]
        code = {"float32": 4.0, "int8": 1.0, "binary": 1 / 8}[self.precision]
        scanned = self.n if self.index is not None else 0
        flops, read = 2.0 * scanned * self.dims[0], scanned * self.dims[0] * code
        rows = min(keeps[0], self.n)
        read += rows * self.width * self.rows.chunks[0][1].dtype.itemsize
        for d, keep in list(zip(self.dims[1:], keeps[1:], strict=True)) or [(self.dims[0], k)]:
            flops += 2.0 * rows * d
            rows = min(keep, self.n)
        return {"flops_per_query": flops, "bytes_per_query": read,
                "index_bytes": float(self.memory_bytes())}

    def __repr__(self) -> str:
        return (f"FunnelIndex(n={self.n}, width={self.width}, dims={self.dims}, "
                f"shortlists={self.shortlists}, first_stage={self.first_stage!r}, "
                f"precision={self.precision!r})")


# -- realistic synthetic corpora -----------------------------------------------------------------
class FittedEmbeddings:
    """Gaussians fitted to real embeddings, to sample corpora of any size with their spectrum.

    The corpus model is N(mean, cov) of the real corpus rows (full covariance), L2-normalised;
    queries are normalise(row + alpha * r), r ~ N(mean, cov) of the real query - matched row
    residuals, with alpha set so that the mean cosine of a query with its row equals the real
    one (`target_cos`)."""

    def __init__(self, corpus: Any, queries: Any, pairs: Sequence[int]):
        """`queries[i]` is a real query whose relevant row is `corpus[pairs[i]]`."""
        rows, q = _as_numpy(corpus, "corpus").astype(np.float64), _as_numpy(queries, "queries").astype(np.float64)
        pairs = np.asarray(pairs)
        if pairs.shape != (len(q),) or len(rows) <= rows.shape[1]:
            raise ValueError(f"need one pair per query ({len(q)}, got {pairs.shape}) and more corpus "
                             f"rows ({len(rows)}) than dims ({rows.shape[1]}) to fit a covariance")
        self.mean, self.chol = self._fit(rows)
        self.r_mean, self.r_chol = self._fit(q - rows[pairs])
        self.target_cos = float(np.mean(np.sum(_normalised(q, "queries") * _normalised(rows, "corpus")[pairs],
                                               axis=1)))
        self.alpha = self._calibrate()

    @staticmethod
    def _fit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cov = np.cov(x, rowvar=False)
        cov += 1e-6 * np.trace(cov) / len(cov) * np.eye(len(cov))  # positive definite
        return x.mean(0), np.linalg.cholesky(cov)

    def corpus(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """(n, E) float32 unit rows sampled from the fitted corpus Gaussian."""
        x = self.mean + rng.standard_normal((n, len(self.mean))) @ self.chol.T
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    def queries(self, rng: np.random.Generator, rows: np.ndarray, alpha: float | None = None) -> np.ndarray:
        """One float32 unit query per row: normalise(row + alpha * residual sample)."""
        r = self.r_mean + rng.standard_normal(rows.shape) @ self.r_chol.T
        q = rows + (self.alpha if alpha is None else alpha) * r
        return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)

    def _calibrate(self, n: int = 4000) -> float:
        """alpha with mean cos(query, its row) = target_cos (bisection; cos falls as alpha grows)."""
        rows = self.corpus(np.random.default_rng(1), n)
        lo, hi = 0.0, 8.0
        for _ in range(40):
            mid = (lo + hi) / 2
            q = self.queries(np.random.default_rng(2), rows, mid)
            lo, hi = (mid, hi) if np.mean(np.sum(q * rows, axis=1)) > self.target_cos else (lo, mid)
        return (lo + hi) / 2


def variance_spectrum(x: Any, dims: Sequence[int]) -> list[float]:
    """Share of the total variance of the rows of `x` held by the first d coordinates, per d."""
    var = np.var(_as_numpy(x, "x").astype(np.float64), axis=0)
    return [float(var[:d].sum() / var.sum()) for d in dims]


def overlap_recall(ids: Any, exact: Any) -> float:
    """Mean over queries of |ids ∩ exact| / k: recall@k against exact search's top k."""
    ids, exact = np.asarray(ids), np.asarray(exact)
    if ids.shape != exact.shape or ids.ndim != 2:
        raise ValueError(f"ids {ids.shape} and exact {exact.shape} must both be (queries, k)")
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / exact.shape[1]
                          for a, b in zip(ids, exact, strict=True)]))


# -- checks ------------------------------------------------------------------------------------
def _check_positive(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_dims(dims: Sequence[int | None], width: int) -> tuple[int, ...]:
    """Stage widths: ints in [1, width] (None = width), strictly ascending."""
    if isinstance(dims, (int, str)) or len(dims) == 0:
        raise ValueError(f"dims must be a non-empty sequence of prefix sizes, got {dims!r}")
    out = []
    for d in dims:
        d = width if d is None else d
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or not 0 < d <= width:
            raise ValueError(f"dims {tuple(dims)}: each must be an int in [1, {width}] or None "
                             f"(= {width}, the embeddings' width), got {d!r}")
        out.append(int(d))
    if any(b <= a for a, b in zip(out, out[1:], strict=False)):
        raise ValueError(f"dims {tuple(dims)} (resolved {tuple(out)}) must be strictly ascending: "
                         "each stage re-ranks with a longer prefix")
    return tuple(out)


def _check_shortlists(shortlists: Sequence[int], stages: int) -> tuple[int, ...]:
    """One positive, non-increasing shortlist per stage but the last."""
    shortlists = tuple(shortlists)
    if len(shortlists) != stages - 1:
        raise ValueError(f"shortlists {shortlists} must have one entry per stage but the last "
                         f"({stages - 1} for {stages} dims)")
    for s in shortlists:
        _check_positive(s, "each shortlist")
    if any(b > a for a, b in zip(shortlists, shortlists[1:], strict=False)):
        raise ValueError(f"shortlists {shortlists} must not increase: a stage keeps at most the "
                         "rows the previous one passed on")
    return tuple(int(s) for s in shortlists)
