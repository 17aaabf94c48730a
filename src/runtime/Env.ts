/**
 * On/off settings read from the environment (`CONCEPTMOE_FUSED`, `CONCEPTMOE_CAPTURE`): unset,
 * `on` or `off`; anything else is an error that names the variable.
 *
 * @since 0.3.0
 */
import { SettingError } from "../internal/RunErrors.ts"

export const switchOn = (name: string): boolean => {
  const v = process.env[name]
  if (v === undefined || v === "" || v === "on") return true
  if (v === "off") return false
  throw new SettingError({ variable: name, value: v, expected: "on or off" })
}
