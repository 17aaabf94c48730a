/**
 * `conceptmoe/infer`: text generation from a trained checkpoint (`Generate.loadTrained`,
 * `Generate.generate`) and the prefill/decode benchmark of matched ConceptMoE variants (`Bench`).
 *
 * @since 0.3.0
 */
export * as Bench from "./Bench.ts"
export * as Generate from "./Generate.ts"
