"""Dense -> VLoRA: a trained dense layer stack re-parameterised as base + low-rank increments.

`compress(dense_stack_params, spec)` takes a dense stack's ``{'per_layer': {path: [L, ...]}}`` and
returns the VLoRA stack params of the same block under ``spec`` (``per_layer`` for untargeted,
``base``, ``inc_a``, ``inc_b`` for targeted matrices, ``inc_vec`` for targeted vectors): exactly
the tree ``LayerStack.init`` makes for that spec, so it loads into the VLoRA model.

Per targeted weight and compound (layers ``W_0 .. W_{s-1}``), with base ``b`` (except in
``relaxed``, layer 0 of the compound IS the base in the model: ``Ŵ_0 = b``):

  anchored     Ŵ_k = b + T_r(W_k - b)
  cumulative   Ŵ_k = Ŵ_{k-1} + T_r(W_k - Ŵ_{k-1})   (the *reconstructed* predecessor: errors do
                                                     not accumulate along the compound)
  tied         Ŵ_k = b
  relaxed      Ŵ_k = b + T_r(W_k - b) for every k, the first included: the base is a shared
               weight, no layer (``base='mean'``, RRT's "Average", is the natural one here)
  1-D targets  exact full-vector increments (W_k - b, or W_k - W_{k-1})

where ``T_r`` is a rank-r truncation of the increment, chosen by ``increments=``:

  ``'svd'`` (the default)   the truncated SVD: the best rank-r approximation in Frobenius norm,
                            i.e. the smallest *weight* error ``||Δ - Δ̂||_F``.
  ``'whitened'``            activation-aware (SVD-LLM, Basis Sharing): the smallest *output* error
                            ``||X (Δ - Δ̂)||_F`` on the layer's calibration inputs ``X``. With the
                            inputs' second moment ``C = E[x x^T] = S S^T``, that is
                            ``S^{-T} T_r(S^T Δ)``. The covariances ``{path: [L, d_in, d_in]}``
                            come from the caller (``covariances=``), e.g. from
                            `convert.calibrate.input_covariances`.
  ``'zero'``                no increment: every layer of a compound equals its base (RRT's zero
                            init). The factors are what the model's ``init='zero_b'`` makes: A
                            kaiming-uniform from ``seed``, B = 0, so that training moves them at
                            once (A = B = 0 would get no gradient). Vector increments are zero.

The factors of an increment are split evenly, ``A = U sqrt(S / scale)``, ``B = sqrt(S / scale)
V^T``, so that ``scale * A @ B = U S V^T`` with the spec's ``scale`` (alpha / r or alpha / sqrt r):
what `stack.materialize` computes. (Whitened: each rank-one term ``(S^{-T} u_i) σ_i v_i^T`` is
split so that its column of A and its row of B have equal norms, which is the plain split when
``C = I``.) The returned errors are measured on `stack.materialize` of the result, i.e. on what the
model will really run: the weight errors always, and, when ``covariances`` are given (with any
``increments``), the output errors ``||S^T (W - Ŵ)||_F / ||S^T W||_F`` too.

Numerical care in whitening: ``C`` may be singular (fewer calibration tokens than ``d_in``, dead
input features) or ill-conditioned. We take the symmetric square root from an eigendecomposition
of ``(C + C^T) / 2``, clip its eigenvalues at 0 and add ``damping * mean(diag C)`` to every one
(``damping=1e-6``; an all-zero ``C`` gives ``S = I``, plain SVD): ``S`` is then invertible with a
condition number of at most ``sqrt(1 + d_in / damping)`` (3.5e3 for d_in = 12, 3.2e4 for 1024,
harmless in float64). The truncation is then the exact minimiser of the damped output error
``||S^T E||^2 + damping mean(diag C) ||E||^2``. Two consequences: its true output error is never
above plain SVD's (for every anchored increment and the first cumulative one, which are taken
against the same base as plain SVD's), and where the calibration inputs leave the minimiser
free (directions they never excite) the ridge picks a small weight error, not an arbitrary one.

Choice of base (``base=``): ``'first'`` (``b = W_0``, the default), ``'mean'`` (the compound
mean), an int ``j`` (``b = W_j``), or ``'auto'``: every one of these candidates is tried for every
targeted weight and compound and the one with the smallest total squared residual
``sum_k ||W_k - Ŵ_k||_F^2`` is kept (with ``increments='whitened'``: the output residual
``sum_k ||S_k^T (W_k - Ŵ_k)||_F^2``); the chosen base per compound is in ``Compressed.bases``.

Why ``'first'``: the mean has the smaller weight residual at low rank (``W_k - mean`` has less
energy than ``W_k - W_0``), but it puts a full-rank error into every compound's layer 0, which has
no increment to absorb it, while the truncated SVD of ``W_k - W_0`` keeps exactly the dominant
(learned) directions of each later layer. So the weight residual ('auto') is the wrong criterion
for the function: on a trained digits ViT (test accuracy 0.879) it keeps 0.13-0.39 at ranks 4-16
where ``'first'`` keeps 0.64-0.89, and ``'first'`` recovers stacks that ARE VLoRA to 1e-8. The
measurement: ``python -m experiments.compare_bases`` (``experiments/results/compare_bases.md``).

Rank per target from a parameter budget (`budget_ranks`, `budget_ranks_tree`): a `VLoRASpec` has
one rank per target pattern, shared by every layer and compound, so the budget picks one rank per
target. The VLoRA count is exactly what ``LayerStack.init`` makes (untargeted params per layer,
one base per compound, ``steps (d_in + d_out) r`` factor entries per compound and matrix
(``Layout.steps``: s - 1, or s for ``relaxed``), full
vector increments), and it must be at most ``fraction`` of the dense count. Greedy: every target
starts at one rank step; the next step goes to the target that removes the most residual energy
per parameter it adds, among those whose step still fits; it stops when no step fits (steps
that remove no energy are still taken while they fit: the budget is the size asked for, and
healing trains those ranks). So the count is within one rank step of the budget. The energy
of a rank is its squared singular value in the increments (whitened ones when covariances are
given), divided by the layer's ``||W||^2`` (or ``||S^T W||^2``): the drop in the sum of squared
relative errors that `compress` reports, so that targets of different scales compare. Cumulative
increments are measured against the true predecessor ``W_{k-1}``, since the reconstructed one
depends on the ranks being chosen.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vlora_jax.core import chain
from vlora_jax.core import stack as stack_lib
from vlora_jax.core.spec import Entry, Layout, VLoRASpec, match_targets

BASES = ("first", "mean", "auto")
INCREMENTS = ("svd", "whitened", "zero")
# The modes whose trees this module makes: a mode added to `chain.MODES` is refused here until
# its compression is written, rather than given another mode's tree.
MODES = ("cumulative", "anchored", "tied", "relaxed")


class Compressed(NamedTuple):
  """The result of `compress`.

  Attributes:
    params: the VLoRA stack params (nested dicts of jax arrays, the groups ``LayerStack.init``
      makes for the spec).
    errors: ``{path: [L]}`` relative errors ``||W_k - Ŵ_k||_F / ||W_k||_F`` of every targeted
      parameter, per layer (untargeted parameters are copied: zero error).
    total: ``[L]`` the same over all targeted parameters of a layer together.
    bases: ``{path: [C]}`` the base chosen per compound: ``'layer<j>'`` or ``'mean'``.
    out_errors: ``{path: [L]}`` relative output errors
      ``||S_k^T (W_k - Ŵ_k)||_F / ||S_k^T W_k||_F`` (``S_k S_k^T`` the given covariance of layer
      k's inputs) of every targeted matrix, or None when no covariances were given.
    out_total: ``[L]`` the same over all targeted matrices of a layer together, or None.
  """
  params: dict
  errors: dict[str, np.ndarray]
  total: np.ndarray
  bases: dict[str, list[str]]
  out_errors: dict[str, np.ndarray] | None = None
  out_total: np.ndarray | None = None


def _flat(tree) -> dict[str, Any]:
  return traverse_util.flatten_dict(tree, sep="/")


def _truncate(delta: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Best rank-r approximation of a [d_in, d_out] matrix: (U_r, S_r, Vt_r)."""
  u, s, vt = np.linalg.svd(delta, full_matrices=False)
  return u[:, :rank], s[:rank], vt[:rank]


def _matrix_in(e: Entry) -> int:
  """``d_in`` of a targeted matrix (the model reads ``[*in, d_out]`` as ``[d_in, d_out]``); 0 for
  anything that is not a targeted matrix (vectors, untargeted params: they need no covariance)."""
  return math.prod(e.shape[:-1]) if e.role in ("lowrank", "tied") and len(e.shape) >= 2 else 0


def whitener(cov: np.ndarray, damping: float) -> tuple[np.ndarray, np.ndarray]:
  """``(S, S^{-1})``, ``S`` symmetric with ``S S = C + damping mean(diag C) I`` (``C`` symmetrised,
  its eigenvalues clipped at 0); ``S = I`` for an all-zero ``C``.

  Why an eigendecomposition and not a Cholesky factor: it never fails on a singular or slightly
  indefinite ``C`` (rounding, fewer calibration tokens than ``d_in``), and the damping it adds is
  relative, so it means the same at every activation scale. Any ``S`` with ``S S^T = C`` gives the
  same whitened truncation; the symmetric one is also its own transpose.
  """
  c = (cov + cov.T) / 2
  lam, q = np.linalg.eigh(c)
  mean = float(np.trace(c)) / c.shape[0]
  lam = np.maximum(lam, 0.0) + (damping * mean if mean > 0 else 1.0)
  root = np.sqrt(lam)
  return (q * root) @ q.T, (q / root) @ q.T


def _factors(delta: np.ndarray, e: Entry, white) -> tuple[np.ndarray, np.ndarray]:
  """Rank-r factors ``(A [d_in, r], B [r, d_out])`` of one increment; ``scale * A @ B`` is its
  truncation: plain (``white=None``) or whitened (``white=(S, S^{-1})``, see the module docstring).
  """
  d = delta.reshape(e.d_in, e.d_out)
  if white is None:
    u, sv, vt = _truncate(d, e.rank)
  else:
    s, s_inv = white
    u, sv, vt = _truncate(s @ d, e.rank)
    u = s_inv @ u  # S^{-T} U Σ V^T: the columns are no longer unit; move their norms into Σ
    norms = np.linalg.norm(u, axis=0)  # > 0: S^{-1} is invertible and u_i is a unit vector
    u, sv = u / norms, sv * norms
  root = np.sqrt(sv / e.scale)
  return u * root, root[:, None] * vt  # rank <= min(d_in, d_out): the spec checked it


def _candidates(w: np.ndarray, choice) -> list[tuple[str, np.ndarray]]:
  """Base candidates for one compound ``w [s, ...]``."""
  s = w.shape[0]
  if choice == "auto":
    return [(f"layer{j}", w[j]) for j in range(s)] + [("mean", w.mean(0))]
  if choice == "first":
    return [("layer0", w[0])]
  if choice == "mean":
    return [("mean", w.mean(0))]
  if not -s <= choice < s:
    raise ValueError(f"compress: base={choice} is not a layer of a compound of {s} layers")
  return [(f"layer{choice % s}", w[choice])]


def _quadratic(covs: np.ndarray, e: np.ndarray) -> np.ndarray:
  """``tr(E_k^T C_k E_k)`` for each ``k`` of ``covs [K, d, d]`` and ``e [K, d, o]``, as
  ``((C E) * E).sum``: a batched matmul (BLAS). The three-operand einsum loops over every
  ``(i, j, o)`` in numpy's C: minutes per candidate at an LLM's sizes."""
  return (np.matmul(covs, e) * e).sum((1, 2))


def _score(w: np.ndarray, rec: np.ndarray, covs: np.ndarray | None) -> float:
  """What 'auto' minimises for one weight and compound: the total squared residual, in the output
  space of the calibration inputs when ``covs [s, d_in, d_in]`` are given."""
  if covs is None:
    return float(((w - rec) ** 2).sum())
  e = (w - rec).reshape(covs.shape[0], covs.shape[1], -1)
  return float(_quadratic(np.asarray(covs, np.float64), e).sum())


def _compress_compound(w: np.ndarray, b: np.ndarray, e: Entry, mode: str, increments: str,
                       whites=None):
  """One compound ``w [s, *shape]`` from base ``b``: (reconstruction [s, *shape], increments).

  Increments: ``(A [S, d_in, r], B [S, r, d_out])`` for low-rank, ``[S, *shape]`` for 1-D (``S``
  steps: ``s - 1``, or ``s`` in the relaxed mode),
  None for tied and for zero low-rank increments (`compress` draws their A). ``whites``: one
  `whitener` per layer of the compound for ``increments='whitened'``.
  """
  s = w.shape[0]
  if mode == "tied" or (increments == "zero" and e.role == "lowrank"):
    return np.stack([b] * s), None
  if increments == "zero":
    return np.stack([b] * s), np.zeros((chain.num_steps(mode, s),) + e.shape)
  # Layer 0 is the base itself, except in the relaxed mode, where it has an increment too.
  first = 0 if mode == "relaxed" else 1
  rec = [b] * first
  if e.role == "vector":
    incs = []
    for k in range(first, s):
      prev = rec[-1] if mode == "cumulative" else b
      incs.append(w[k] - prev)
      rec.append(w[k].copy())
    return np.stack(rec), np.stack(incs)
  a_s, b_s = [], []
  for k in range(first, s):
    prev = rec[-1] if mode == "cumulative" else b
    a_k, b_k = _factors(w[k] - prev, e, None if whites is None else whites[k])
    a_s.append(a_k)
    b_s.append(b_k)
    rec.append(prev + (e.scale * a_k @ b_k).reshape(e.shape))
  return np.stack(rec), (np.stack(a_s), np.stack(b_s))


def _check_covariances(covariances, layout: Layout, shapes: dict, who: str):
  """``{path: float64 [L, d_in, d_in]}`` for every targeted matrix, from the caller's dict (flat
  ``{'a/b/kernel': ...}`` or nested); paths of the block that are not targeted matrices are
  ignored (a caller may collect every kernel's inputs), anything else is an error."""
  if not isinstance(covariances, dict):
    raise ValueError(f"{who}: covariances must be a dict {{path: [L, d_in, d_in]}}, got "
                     f"{type(covariances).__name__}")
  given = _flat(covariances)
  unknown = sorted(set(given) - set(shapes))
  if unknown:
    raise ValueError(f"{who}: covariances has paths {unknown} that are not parameters of the "
                     f"block; its parameters are {sorted(shapes)}")
  need = {e.path: _matrix_in(e) for e in layout.entries if _matrix_in(e)}
  missing = sorted(set(need) - set(given))
  if missing:
    raise ValueError(f"{who}: covariances is missing the targeted matrices {missing}: give one "
                     f"[L, d_in, d_in] covariance of its inputs for each of {sorted(need)}")
  out = {}
  for path, d_in in need.items():
    c = np.asarray(given[path], np.float64)
    want = (layout.num_layers, d_in, d_in)
    if c.shape != want:
      raise ValueError(f"{who}: covariances[{path!r}] has shape {c.shape}; the inputs of "
                       f"{path!r} (shape {shapes[path]}) need [L, d_in, d_in] = {want}")
    if not np.isfinite(c).all():
      raise ValueError(f"{who}: covariances[{path!r}] has NaN or inf entries")
    out[path] = c
  return out


def _check(dense_stack_params, spec: VLoRASpec, base, who: str = "compress", increments="svd",
           covariances=None, damping=1e-6):
  """Validates everything before any work: ``(layout, {path: covariance} or None)``."""
  if not isinstance(spec, VLoRASpec):
    raise ValueError(f"{who}: spec={spec!r} must be a VLoRASpec")
  if spec.mode not in MODES:
    raise ValueError(f"{who}: spec.mode={spec.mode!r} is not a mode it compresses into: "
                     f"allowed are {list(MODES)}")
  if not (isinstance(dense_stack_params, dict) and set(dense_stack_params) == {"per_layer"}):
    keys = sorted(dense_stack_params) if isinstance(dense_stack_params, dict) else \
        type(dense_stack_params).__name__
    raise ValueError(f"{who}: dense_stack_params must be a dense stack {{'per_layer': ...}}, "
                     f"got {keys}")
  if not (base in BASES or (isinstance(base, int) and not isinstance(base, bool))):
    raise ValueError(f"{who}: base={base!r}: allowed are {list(BASES)} or a layer index")
  if increments not in INCREMENTS:
    raise ValueError(f"{who}: increments={increments!r}: allowed are {list(INCREMENTS)}")
  if isinstance(damping, bool) or not isinstance(damping, (int, float)) or \
      not 0 < damping < math.inf:
    raise ValueError(f"{who}: damping={damping!r}: must be a finite number > 0 (the ridge that "
                     "keeps whitening invertible, relative to mean(diag C))")
  if increments == "whitened" and covariances is None:
    raise ValueError(f"{who}: increments='whitened' needs covariances={{path: [L, d_in, d_in]}}, "
                     "the second moments of each targeted matrix's inputs; got None")
  flat = _flat(dense_stack_params["per_layer"])
  depths = {a.shape[0] for a in flat.values()}
  if len(depths) != 1:
    raise ValueError(f"{who}: per_layer leaves disagree on the number of layers: {sorted(depths)}")
  shapes = {p: tuple(a.shape[1:]) for p, a in flat.items()}
  layout = spec.layout(shapes, depths.pop())
  covs = None if covariances is None else _check_covariances(covariances, layout, shapes, who)
  return layout, covs


def compress(dense_stack_params, spec: VLoRASpec, base: str | int = "first", *,
             increments: str = "svd", covariances: dict | None = None, damping: float = 1e-6,
             seed: int = 0) -> Compressed:
  """Dense stack params -> VLoRA stack params under ``spec`` (see the module docstring).

  Args:
    dense_stack_params: ``{'per_layer': {...}}`` of a dense `LayerStack`, leaves ``[L, ...]``.
    spec: the target parameterisation (compound size, targets, ranks, alphas, mode, scaling).
    base: ``'first'`` (layer 0 of each compound, the default), ``'mean'``, a layer index inside
      the compound, or ``'auto'`` (the candidate with the smallest residual per weight and
      compound; see the module docstring for why that is not the default).
    increments: ``'svd'`` (plain truncated SVD, the default), ``'whitened'`` (activation-aware:
      needs ``covariances``) or ``'zero'`` (every layer equals its compound's base).
    covariances: ``{path: [L, d_in, d_in]}``, the second moment ``E[x x^T]`` of the inputs of every
      targeted matrix in every layer (float64 numpy), from the caller's calibration batches.
      Needed for ``'whitened'``; with any ``increments`` it adds the output errors to the result.
    damping: the relative ridge of the whitening (see `whitener`).
    seed: the key of the random A factors of ``increments='zero'``.

  Returns:
    `Compressed`: ``params`` loadable as the VLoRA stack's params, per-layer relative ``errors``,
    their ``total`` per layer, the chosen ``bases``, and the output errors if ``covariances``.
  """
  layout, covs = _check(dense_stack_params, spec, base, "compress", increments, covariances,
                        damping)
  if isinstance(seed, bool) or not isinstance(seed, int):
    raise ValueError(f"compress: seed={seed!r} must be an int")
  flat = _flat(dense_stack_params["per_layer"])
  s, n_c, mode = layout.compound_size, layout.compounds, spec.mode
  whitened = increments == "whitened"
  groups = {g: {} for g in stack_lib.GROUPS}
  bases = {}
  for i, e in enumerate(layout.entries):
    dtype = np.asarray(flat[e.path]).dtype
    if e.role == "full":
      groups["per_layer"][e.path] = jnp.asarray(flat[e.path])
      continue
    w = np.asarray(flat[e.path], np.float64).reshape((n_c, s) + e.shape)
    c_cov = covs[e.path].reshape((n_c, s) + covs[e.path].shape[1:]) \
        if whitened and e.path in covs else None
    per_c, chosen = [], []
    for c in range(n_c):
      whites = None
      if c_cov is not None and e.role == "lowrank":
        whites = [whitener(c_cov[c, k], damping) for k in range(s)]
      best = None
      for name, b in _candidates(w[c], base):
        rec, incs = _compress_compound(w[c], b, e, mode, increments, whites)
        residual = _score(w[c], rec, None if c_cov is None else c_cov[c])
        if best is None or residual < best[0]:
          best = (residual, name, b, incs)
      chosen.append(best[1])
      per_c.append(best[2:])
    bases[e.path] = chosen
    groups["base"][e.path] = jnp.asarray(np.stack([b for b, _ in per_c]), dtype)
    if e.role == "vector" and mode != "tied":
      groups["inc_vec"][e.path] = jnp.asarray(np.stack([i for _, i in per_c]), dtype)
    elif e.role == "lowrank" and increments == "zero":
      key = jax.random.fold_in(jax.random.key(seed), i)  # as the model's init: one key per entry
      groups["inc_a"][e.path], groups["inc_b"][e.path] = chain.init_factors(
          key, compounds=n_c, steps=layout.steps, d_in=e.d_in, d_out=e.d_out, rank=e.rank,
          init="zero_b", dtype=dtype)
    elif e.role == "lowrank":
      groups["inc_a"][e.path] = jnp.asarray(np.stack([i[0] for _, i in per_c]), dtype)
      groups["inc_b"][e.path] = jnp.asarray(np.stack([i[1] for _, i in per_c]), dtype)
  params = {g: traverse_util.unflatten_dict(v, sep="/") for g, v in groups.items() if v}
  got = _flat(stack_lib.materialize(params, layout))
  want = _flat(dense_stack_params["per_layer"])
  errors, total = _errors(want, got, layout)
  out_errors, out_total = (None, None) if covs is None else _out_errors(want, got, layout, covs)
  return Compressed(params, errors, total, bases, out_errors, out_total)


def _errors(want, got, layout: Layout):
  """Relative errors of what the model runs (`stack.materialize`) against the dense weights."""
  errors, num, den = {}, 0.0, 0.0
  for e in layout.entries:
    if e.role == "full":
      continue
    w = np.asarray(want[e.path], np.float64).reshape(layout.num_layers, -1)
    d = np.asarray(got[e.path], np.float64).reshape(layout.num_layers, -1) - w
    sq_d, sq_w = (d ** 2).sum(1), (w ** 2).sum(1)
    errors[e.path] = np.sqrt(sq_d / np.maximum(sq_w, 1e-300))
    num, den = num + sq_d, den + sq_w
  total = np.sqrt(num / np.maximum(den, 1e-300)) if errors else np.zeros(layout.num_layers)
  return errors, total


def _out_errors(want, got, layout: Layout, covs):
  """Relative output errors ``||S^T E|| / ||S^T W||`` per targeted matrix and layer, with the
  undamped covariances: ``||S^T E||_F^2 = tr(E^T C E)``, the mean squared output error."""
  errors, num, den = {}, 0.0, 0.0
  for path, c in covs.items():
    w = np.asarray(want[path], np.float64).reshape(c.shape[0], c.shape[1], -1)
    d = np.asarray(got[path], np.float64).reshape(w.shape) - w
    c = np.asarray(c, np.float64)
    sq_d, sq_w = np.maximum(_quadratic(c, d), 0.0), np.maximum(_quadratic(c, w), 0.0)
    errors[path] = np.sqrt(sq_d / np.maximum(sq_w, 1e-300))
    num, den = num + sq_d, den + sq_w
  total = np.sqrt(num / np.maximum(den, 1e-300)) if errors else np.zeros(layout.num_layers)
  return errors, total


def _stack_covariances(covariances, stacks: list[str], who: str):
  """``{stack path: covariances or None}`` from a tree-level ``{stack path: {path: ...}}``."""
  if covariances is None:
    return {p: None for p in stacks}
  if not isinstance(covariances, dict):
    raise ValueError(f"{who}: covariances must be a dict {{stack path: {{path: [L, d_in, "
                     f"d_in]}}}}, got {type(covariances).__name__}")
  unknown = sorted(set(covariances) - set(stacks))
  if unknown:
    raise ValueError(f"{who}: covariances has stack paths {unknown} that are not stacks of the "
                     f"tree; its stacks are {stacks}")
  return {p: covariances.get(p) for p in stacks}


def _stacks(tree, path=()) -> list[str]:
  if stack_lib.is_stack(tree):
    return ["/".join(path)]
  if isinstance(tree, dict):
    return [p for k, v in tree.items() for p in _stacks(v, path + (k,))]
  return []


def compress_tree(params, spec: VLoRASpec, base: str | int = "first", *, increments: str = "svd",
                  covariances: dict | None = None, damping: float = 1e-6, seed: int = 0):
  """Every dense stack in a model's params tree -> VLoRA (the inverse direction of `stack.merge`).

  ``increments``, ``damping`` and ``seed`` are `compress`'s; ``covariances`` is ``{stack path
  (e.g. 'blocks'): {path: [L, d_in, d_in]}}``. Returns ``(params, {stack path: Compressed})``:
  ``params`` loads into the model built with ``vlora=spec`` (e.g. ``ViT(..., vlora=spec)``); the
  rest of the tree is kept as is.
  """
  params = nn.unbox(params)
  covs = _stack_covariances(covariances, _stacks(params), "compress_tree")
  if increments == "whitened" and covariances is not None:
    missing = sorted(p for p, c in covs.items() if c is None)
    if missing:
      raise ValueError(f"compress_tree: increments='whitened' but covariances has no entry for "
                       f"the stacks {missing}")
  reports = {}

  def walk(tree, path):
    if stack_lib.is_stack(tree):
      name = "/".join(path)
      out = compress(tree, spec, base, increments=increments, covariances=covs[name],
                     damping=damping, seed=seed)
      reports[name] = out
      return out.params
    if isinstance(tree, dict):
      return {k: walk(v, path + (k,)) for k, v in tree.items()}
    return tree

  return walk(params, ()), reports


# ------------------------------------------------------------------------ ranks from a budget


class Budget(NamedTuple):
  """The result of `budget_ranks` / `budget_ranks_tree`.

  Attributes:
    spec: the given spec with one chosen rank per target (``spec.rank`` a tuple in target order).
    ranks: ``{target pattern: rank}``. Targets that match no matrix (only vectors) keep the
      given spec's rank: it changes no count.
    count: the parameter count of the VLoRA stack(s) at those ranks (plus, for the tree, every
      parameter outside the stacks), exactly as ``LayerStack.init`` makes them.
    dense: the same count of the dense params.
    fraction: ``count / dense``, at most the requested fraction.
    energy: ``{target pattern: [max rank]}`` the relative residual energy each rank removes (see
      the module docstring); the chosen rank of a target keeps the first ``ranks[t]`` of them.
  """
  spec: VLoRASpec
  ranks: dict[str, int]
  count: int
  dense: int
  fraction: float
  energy: dict[str, np.ndarray]


class _Summary(NamedTuple):
  """One stack's share of a budget: counts that no rank changes, and per target index the
  parameters one rank adds, the largest rank every matched matrix allows, and energy per rank."""
  fixed: int
  dense: int
  cost: dict[int, int]
  max_rank: dict[int, int]
  energy: dict[int, np.ndarray]


def _summarise(dense_stack_params, spec: VLoRASpec, covariances, base, damping,
               who: str) -> _Summary:
  # The layout at rank 1: the given ranks are what we replace, they must not fail the checks.
  layout, covs = _check(dense_stack_params, dataclasses.replace(spec, rank=1), base, who,
                        "svd", covariances, damping)
  flat = _flat(dense_stack_params["per_layer"])
  shapes = {p: tuple(a.shape[1:]) for p, a in flat.items()}
  hits = {p: h for p, _, h in match_targets("vlora.targets", spec.targets, shapes)}
  s, n_c, n_l = layout.compound_size, layout.compounds, layout.num_layers
  steps, first = layout.steps, s - layout.steps  # first: the first layer with an increment
  fixed = dense = 0
  cost, max_rank, energy = {}, {}, {}
  for e in layout.entries:
    n = math.prod(e.shape)
    dense += n_l * n
    if e.role == "full":
      fixed += n_l * n
      continue
    fixed += n_c * n + (n_c * steps * n if e.role == "vector" else 0)  # base (+ full vectors)
    if e.role != "lowrank":
      continue
    t = hits[e.path]
    cost[t] = cost.get(t, 0) + n_c * steps * (e.d_in + e.d_out)
    w = np.asarray(flat[e.path], np.float64).reshape(n_c, s, e.d_in, e.d_out)
    c_cov = None if covs is None else covs[e.path].reshape(n_c, s, e.d_in, e.d_in)
    gain = np.zeros(min(e.d_in, e.d_out))
    for c in range(n_c):
      b = _candidates(w[c], base)[0][1].reshape(e.d_in, e.d_out)
      for k in range(first, s):
        prev = w[c, k - 1] if spec.mode == "cumulative" and k > 1 else b
        delta, ref = w[c, k] - prev, w[c, k]
        if c_cov is not None:
          white, _ = whitener(c_cov[c, k], damping)
          delta, ref = white @ delta, white @ ref
        gain += np.linalg.svd(delta, compute_uv=False) ** 2 / max(float((ref ** 2).sum()), 1e-300)
    max_rank[t] = min(max_rank.get(t, gain.size), gain.size)
    energy[t] = gain[:max_rank[t]] + (energy[t][:max_rank[t]] if t in energy else 0.0)
  return _Summary(fixed, dense, cost, max_rank, energy)


def _allocate(summaries: list[_Summary], spec: VLoRASpec, fraction, outside: int, step,
              who: str) -> Budget:
  """The greedy of the module docstring over the targets of every summarised stack."""
  fixed = outside + sum(x.fixed for x in summaries)
  dense = outside + sum(x.dense for x in summaries)
  cost, max_rank, energy = {}, {}, {}
  for x in summaries:
    for t, c in x.cost.items():
      cost[t] = cost.get(t, 0) + c
      max_rank[t] = min(max_rank.get(t, x.max_rank[t]), x.max_rank[t])
    for t, g in x.energy.items():
      energy[t] = g[:max_rank[t]] + (energy[t][:max_rank[t]] if t in energy else 0.0)
  ranks = {t: min(step, max_rank[t]) for t in cost}
  count = fixed + sum(cost[t] * r for t, r in ranks.items())
  if count > fraction * dense:
    raise ValueError(f"{who}: fraction={fraction} is below the smallest VLoRA model of this spec: "
                     f"{count:,} of {dense:,} parameters ({count / dense:.4f}) at ranks "
                     f"{ {spec.targets[t]: r for t, r in ranks.items()} } (step={step})")
  while True:
    best = None
    for t, r in ranks.items():
      new = min(r + step, max_rank[t])
      extra = cost[t] * (new - r)
      if new == r or count + extra > fraction * dense:
        continue
      per_param = float(energy[t][r:new].sum()) / extra
      if best is None or per_param > best[0]:
        best = (per_param, t, new, extra)
    if best is None:
      break
    _, t, new, extra = best
    ranks[t], count = new, count + extra
  chosen = tuple(ranks.get(t, r) for t, r in enumerate(spec.ranks))
  return Budget(dataclasses.replace(spec, rank=chosen), dict(zip(spec.targets, chosen)), count,
                dense, count / dense, {spec.targets[t]: g for t, g in energy.items()})


def _check_budget(spec, fraction, base, step, who: str):
  if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or \
      not 0 < fraction <= 1:
    raise ValueError(f"{who}: fraction={fraction!r}: must be a number in (0, 1], the share of the "
                     "dense parameter count")
  if isinstance(step, bool) or not isinstance(step, int) or step < 1:
    raise ValueError(f"{who}: step={step!r}: must be an integer >= 1 (ranks move in steps of it)")
  if base == "auto":
    raise ValueError(f"{who}: base='auto' picks a base per rank, so it cannot price ranks; "
                     "allowed are 'first', 'mean' or a layer index")
  if isinstance(spec, VLoRASpec):
    if spec.mode not in MODES:
      raise ValueError(f"{who}: spec.mode={spec.mode!r} is not a mode it compresses into: "
                       f"allowed are {list(MODES)}")
    if spec.mode == "tied":
      raise ValueError(f"{who}: spec.mode='tied' has no increments: ranks change no count")
    if spec.compound_size == 1 and spec.mode != "relaxed":
      raise ValueError(f"{who}: spec.compound_size=1 has no increments: ranks change no count")


def budget_ranks(dense_stack_params, spec: VLoRASpec, fraction: float,
                 covariances: dict | None = None, *, base: str | int = "first", step: int = 1,
                 damping: float = 1e-6) -> Budget:
  """One rank per target of ``spec`` so that the VLoRA stack has at most ``fraction`` of the
  dense stack's parameters, given by residual energy (see the module docstring).

  Args:
    dense_stack_params: ``{'per_layer': {...}}`` of a dense `LayerStack`, leaves ``[L, ...]``.
    spec: everything but the ranks (its own ranks are replaced).
    fraction: in (0, 1], of the dense stack's count.
    covariances: as in `compress`: the energies are then whitened (output space).
    base: the base the increments are measured from, as in `compress` (not ``'auto'``).
    step: ranks are multiples of it (capped at a target's largest rank): e.g. 8 for TPU tiles.
    damping: as in `compress`.

  Returns:
    `Budget`: the spec to pass to `compress`, the ranks, the counts and the achieved fraction.
  """
  _check_budget(spec, fraction, base, step, "budget_ranks")
  summary = _summarise(dense_stack_params, spec, covariances, base, damping, "budget_ranks")
  return _allocate([summary], spec, fraction, 0, step, "budget_ranks")


def budget_ranks_tree(params, spec: VLoRASpec, fraction: float, covariances: dict | None = None,
                      *, base: str | int = "first", step: int = 1,
                      damping: float = 1e-6) -> Budget:
  """`budget_ranks` over a whole model's params tree: ``fraction`` of the whole dense model
  (embeddings, heads and every stack), one rank per target for every stack together (a spec is
  shared by the model's stacks). ``covariances``: ``{stack path: {path: [L, d_in, d_in]}}``."""
  who = "budget_ranks_tree"
  _check_budget(spec, fraction, base, step, who)
  params = nn.unbox(params)
  covs = _stack_covariances(covariances, _stacks(params), who)
  summaries, outside = [], 0

  def walk(tree, path):
    nonlocal outside
    if stack_lib.is_stack(tree):
      name = "/".join(path)
      summaries.append(_summarise(tree, spec, covs[name], base, damping, f"{who} ({name!r})"))
    elif isinstance(tree, dict):
      for k, v in tree.items():
        walk(v, path + (k,))
    else:
      outside += math.prod(np.shape(tree))

  walk(params, ())
  if not summaries:
    raise ValueError(f"{who}: params has no layer stack ({{'per_layer': ...}} subtree)")
  return _allocate(summaries, spec, fraction, outside, step, who)
