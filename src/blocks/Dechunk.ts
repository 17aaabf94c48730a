/**
 * ConceptMoE's dechunk: EMA over concepts, plug-back to tokens, STE confidence (method spec §6).
 *
 * ĉ^ema_m = p_φ(m)·ĉ_m + (1 − p_φ(m))·ĉ^ema_{m−1}; token n receives ĉ^ema_ψ(n) (ψ(n) = boundaries ≤ n,
 * minus 1) and z_n = ĥ_n + STE(c_n)·ĉ^ema_ψ(n), with c_n = p_n if b_n else 1 − p_n (forward value 1).
 * `[batch, concepts, d] → [batch, seq, d]`.
 *
 * Params: none. FLOPs: none counted (a scan and a gather, not matmuls).
 *
 * @since 0.1.0
 */
import { Schema } from "effect"
import * as Cost from "../cost/Cost.ts"
import { type Block, type BlockKind, leaf, type Named } from "../graph/Block.ts"
import { Dim } from "../graph/Spec.ts"

export const DechunkSpec = Schema.Struct({ d: Dim })
export type DechunkSpec = typeof DechunkSpec.Type

export const Dechunk: BlockKind<DechunkSpec> = {
  name: "dechunk",
  summary: "EMA over concepts, plugged back to tokens, with STE confidence",
  spec: DechunkSpec,
  io: (s) => ({ in: s?.d, out: s?.d }),
  cost: () => Cost.zero
}

/** @category constructors */
export const dechunk = <const D extends number>(spec: { readonly d: D } & Named): Block<D, D> => leaf(Dechunk, spec)
