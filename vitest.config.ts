import { defaultClientConditions, defaultServerConditions } from "vite"
import { defineConfig } from "vitest/config"

// "conceptmoe-source": `import … from "conceptmoe"` resolves to the TypeScript sources inside this
// repository (package.json's exports), so tests and examples import the package as users do.
const source = "conceptmoe-source"

export default defineConfig({
  resolve: { conditions: [source, ...defaultClientConditions] },
  ssr: { resolve: { conditions: [source, ...defaultServerConditions], externalConditions: [source] } },
  test: {
    include: ["tests/**/*.test.ts"],
    reporters: ["default", "./tests/support/summary-reporter.ts"],
    testTimeout: 60_000
  }
})
