/**
 * The names of our kernels, as tfjs knows them: the makers of `Fused.ts` run them, and each
 * backend's folder registers those it has (`webgpu/Kernels.ts`, `wasm/Kernels.ts`); a maker takes
 * the fused route wherever the current backend has the kernel.
 *
 * @since 0.4.0
 */
export const kernels = {
  m: "ConceptmoeAdamFirstMoment",
  v: "ConceptmoeAdamSecondMoment",
  w: "ConceptmoeAdamWeights",
  norm: "ConceptmoeRmsNorm",
  normDx: "ConceptmoeRmsNormGradX",
  normDg: "ConceptmoeRmsNormGradRows",
  rotate: "ConceptmoeRotate",
  unrotate: "ConceptmoeRotateBack",
  gelu: "ConceptmoeGelu",
  geluGrad: "ConceptmoeGeluGrad",
  silu: "ConceptmoeSilu",
  siluGrad: "ConceptmoeSiluGrad",
  nll: "ConceptmoeMaskedNll",
  nllGrad: "ConceptmoeMaskedNllGrad",
  sumMiddle: "ConceptmoeSumMiddle",
  topMask: "ConceptmoeTopMask",
  sumSquares: "ConceptmoeSumSquares",
  softmax: "ConceptmoeMaskedSoftmax",
  softmaxGrad: "ConceptmoeMaskedSoftmaxGrad",
  combine: "ConceptmoeCombine",
  combineGradY: "ConceptmoeCombineGradY",
  combineGradG: "ConceptmoeCombineGradG",
  routeSlots: "ConceptmoeRouteSlots",
  routeTokens: "ConceptmoeRouteTokens",
  toSlots: "ConceptmoeToSlots",
  toSlotsWeighted: "ConceptmoeToSlotsWeighted",
  fromSlots: "ConceptmoeFromSlots",
  fromSlotsGradW: "ConceptmoeFromSlotsGradW",
  routeGroups: "ConceptmoeRouteGroups",
  sumGroups: "ConceptmoeSumGroups"
} as const

/**
 * Kernels only the wasm backend has: AdamW in one kernel, Σx² over all the gradients, RMSNorm's two
 * gradients in one pass, a matrix product that skips a causal map's empty triangle.
 */
export const wasmKernels = {
  adamw: "ConceptmoeAdamW",
  sumSquares: "ConceptmoeSumSquaresAll",
  normGrad: "ConceptmoeRmsNormGrad",
  triangularMatMul: "ConceptmoeTriangularMatMul"
} as const
