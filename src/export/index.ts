/**
 * `conceptmoe/export`: the PyTorch export of a model and its weights (`Export.writeExport`: graph
 * JSON, weights in PyTorch layout, the `conceptmoe_torch` package and `train.py`), the import of a
 * Hugging Face checkpoint or a PyTorch-trained export back into a run directory (`Import.importHf`,
 * `Import.importRun`), and the reference outputs a PyTorch build of the same graph is checked
 * against (`Reference.reference`).
 *
 * @since 0.4.0
 */
export * as Export from "./Export.ts"
export * as Import from "./Import.ts"
export * as Reference from "./Reference.ts"
