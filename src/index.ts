/**
 * conceptmoe: language models as typed graphs of pure blocks, with static parameter and FLOP
 * budgets. The public API, one namespace per module.
 *
 * This entry point loads no tensor library: building graphs, costing them, matching budgets and
 * reallocating compute need only `effect`. Running models is in the subpath entry points:
 * `conceptmoe/runtime` (backends, lowering, the executed-cost check, decode sessions),
 * `conceptmoe/train` (data, the training loop, checkpoints, comparisons, conversion),
 * `conceptmoe/infer` (text generation, the inference benchmark), `conceptmoe/export` (the PyTorch
 * export and the import of checkpoints) and `conceptmoe/report` (plots and the reallocation report).
 * A custom block's `apply` is written against the types in
 * {@link Apply}.
 *
 * @since 0.1.0
 */
export * as Analyze from "./graph/Analyze.ts"
export * as Block from "./graph/Block.ts"
export * as Combinators from "./graph/Combinators.ts"
export * as GraphErrors from "./graph/Errors.ts"
export * as Registry from "./blocks/Registry.ts"
export * as Spec from "./graph/Spec.ts"
export * as Surgery from "./graph/Surgery.ts"

export * as Apply from "./graph/Apply.ts"

export * as Attention from "./blocks/Attention.ts"
export * as Chunker from "./blocks/Chunker.ts"
export * as ConceptContext from "./blocks/ConceptContext.ts"
export * as ConceptStage from "./blocks/ConceptStage.ts"
export * as Dechunk from "./blocks/Dechunk.ts"
export * as JointAttention from "./blocks/JointAttention.ts"
export * as Projector from "./blocks/Projector.ts"
export * as Embedding from "./blocks/Embedding.ts"
export * as LayerNorm from "./blocks/LayerNorm.ts"
export * as Linear from "./blocks/Linear.ts"
export * as LMHead from "./blocks/LMHead.ts"
export * as MLA from "./blocks/MLA.ts"
export * as MLP from "./blocks/MLP.ts"
export * as MoE from "./blocks/MoE.ts"
export * as RMSNorm from "./blocks/RMSNorm.ts"
export * as Rotary from "./blocks/Rotary.ts"

export * as Budget from "./cost/Budget.ts"
export * as Cost from "./cost/Cost.ts"
export * as Report from "./cost/Report.ts"
export * as Stages from "./cost/Stages.ts"

export * as ConceptMoE from "./models/ConceptMoE.ts"
export * as Config from "./models/Config.ts"
export * as Decoder from "./models/Decoder.ts"
export * as HuggingFace from "./models/HuggingFace.ts"
export * as Load from "./models/Load.ts"
export * as ModelErrors from "./models/Errors.ts"
export * as Reallocate from "./models/Reallocate.ts"
