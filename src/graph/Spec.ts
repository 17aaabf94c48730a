/**
 * Schema building blocks shared by block specs and config files.
 *
 * @since 0.1.0
 */
import { Effect, Schema, SchemaIssue } from "effect"

/** A positive integer size (a dimension, a count). */
export const Dim = Schema.Int.pipe(Schema.check(Schema.isGreaterThan(0)))

/** A non-negative integer count. */
export const Count = Schema.Int.pipe(Schema.check(Schema.isGreaterThanOrEqualTo(0)))

/** A positive finite number. */
export const PositiveNumber = Schema.Finite.pipe(Schema.check(Schema.isGreaterThan(0)))

/** A key that decodes to `value` when absent. */
export const withDefault = <S extends Schema.Top>(schema: S, value: S["Encoded"]) =>
  schema.pipe(Schema.withDecodingDefaultKey(Effect.succeed(value)))

/** The part name a matmul is reported under. */
export const PartName = Schema.String.pipe(Schema.check(Schema.isMinLength(1)))

/**
 * A cross-field check: `test` returns undefined when valid, or `[field, message]` naming the field
 * that is wrong.
 */
export const crossCheck = <T>(test: (value: T) => readonly [string, string] | undefined) =>
  Schema.makeFilter<T>((value) => {
    const bad = test(value)
    return bad === undefined ? undefined : { path: [bad[0]], issue: bad[1] }
  })

/** One problem found while checking a value: where and what. */
export interface Problem {
  readonly path: ReadonlyArray<string | number>
  readonly message: string
}

const formatter = SchemaIssue.makeFormatterStandardSchemaV1()

/** Flattens a Schema issue into path-named problems. */
export const problemsOf = (issue: SchemaIssue.Issue): ReadonlyArray<Problem> =>
  formatter(issue).issues.map((i) => ({
    path: (i.path ?? []).map((p) => (typeof p === "object" && p !== null && "key" in p ? p.key : p) as string | number),
    message: i.message
  }))

/** `a.b[0].c` */
export const formatPath = (path: ReadonlyArray<string | number>): string =>
  path.reduce<string>((acc, p) => (typeof p === "number" ? `${acc}[${p}]` : acc === "" ? p : `${acc}.${p}`), "")
