/**
 * Running a function with a variable temporarily set: the value is swapped in, the function runs,
 * and the previous value is put back on every exit, a throw included.
 *
 * @since 0.4.0
 */

/**
 * Sets the variable behind `get`/`set` to `value`, runs `f`, and restores the value it had before,
 * in a `finally`. Returns what `f` returns.
 */
export const withSwapped = <S, A>(get: () => S, set: (value: S) => void, value: S, f: () => A): A => {
  const outer = get()
  set(value)
  try {
    return f()
  } finally {
    set(outer)
  }
}
