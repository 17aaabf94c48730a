/**
 * Replacing one of tfjs's kernels for one backend by ours: the one mechanism behind each backend
 * folder's fixes (`cpu/Fixes.ts`, `wasm/Fixes.ts`, `webgpu/Fixes.ts`).
 *
 * @since 0.5.0
 */
import type * as TF from "@tensorflow/tfjs"
import type { Tf } from "../graph/Apply.ts"

/**
 * Registers `kernelFunc(stock)` as `kernelName` on `backendName` in place of the stock kernel,
 * keeping the stock kernel's setup; `stock` stays callable for the cases ours leaves to it.
 */
export const overrideKernel = (tf: Tf, kernelName: string, backendName: string, kernelFunc: (stock: TF.KernelConfig) => TF.KernelFunc): void => {
  const stock = tf.getKernel(kernelName, backendName)!
  tf.unregisterKernel(kernelName, backendName)
  tf.registerKernel({ kernelName, backendName, ...(stock.setupFunc === undefined ? {} : { setupFunc: stock.setupFunc }), kernelFunc: kernelFunc(stock) })
}
