/**
 * The environment settings of the tensor code (`internal/Settings.ts`), kept with the tensor
 * library they were resolved for: `Backend.load` reads them through Effect's `Config` and
 * {@link useSettings}; the synchronous code that runs inside tfjs (kernels, capture) reads them with
 * {@link settingsOf}. A tensor library that no backend load has seen runs with the defaults.
 *
 * @since 0.3.0
 */
import type { Tf } from "../graph/Apply.ts"
import * as Settings from "../internal/Settings.ts"

// keyed by the library's environment object, so two copies of tfjs keep their own settings
const resolved = new WeakMap<object, Settings.RuntimeSettings>()

/** Keeps `settings` for the tensor library `tf` (each backend load resolves them again). */
export const useSettings = (tf: Tf, settings: Settings.RuntimeSettings): void => {
  resolved.set(tf.env(), settings)
}

/** The settings resolved for `tf` when its backend loaded, else the defaults. */
export const settingsOf = (tf: Tf): Settings.RuntimeSettings => resolved.get(tf.env()) ?? Settings.defaults
