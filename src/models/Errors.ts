/**
 * Typed errors of config loading: each names the file, and where it applies the field path.
 *
 * @since 0.1.0
 */
import { Schema } from "effect"

export const FieldProblem = Schema.Struct({ field: Schema.String, message: Schema.String })
export type FieldProblem = typeof FieldProblem.Type

/**
 * A config file could not be read or is not a valid config.
 *
 * - `missing`: no such file; `unreadable`: any other I/O failure;
 * - `json`: not valid JSON;
 * - `unsupported`: an unknown `model_type` or `kind`;
 * - `invalid`: fields missing, ill-typed or inconsistent (each listed with its path).
 */
export class ConfigError extends Schema.TaggedError<ConfigError>()("ConfigError", {
  file: Schema.String,
  reason: Schema.Literals(["missing", "unreadable", "json", "unsupported", "invalid"]),
  problems: Schema.Array(FieldProblem)
}) {
  override get message(): string {
    const lines = this.problems.map((p) => (p.field === "" ? p.message : `${p.field}: ${p.message}`))
    return lines.length === 1 ? `${this.file}: ${lines[0]}` : `${this.file}:\n${lines.map((l) => `  ${l}`).join("\n")}`
  }
}
