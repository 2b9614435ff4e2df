// Validate GLB files with the Khronos glTF validator (npm gltf-validator, offline).
// Usage: node scripts/validate_gltf.mjs FILE.glb [...]  -> one JSON line per file:
// {"file", "errors", "warnings", "messages": [first few issues]}; exit 1 when any file has errors.
import { readFile } from "node:fs/promises";
import validator from "gltf-validator";

let failed = false;
for (const file of process.argv.slice(2)) {
  const report = await validator.validateBytes(new Uint8Array(await readFile(file)), { maxIssues: 50 });
  const issues = report.issues;
  if (issues.numErrors > 0) failed = true;
  console.log(JSON.stringify({
    file,
    errors: issues.numErrors,
    warnings: issues.numWarnings,
    messages: issues.messages.slice(0, 10).map((m) => `${m.severity === 0 ? "error" : "issue"} ${m.code}: ${m.message} (${m.pointer ?? ""})`),
  }));
}
process.exit(failed ? 1 : 0);
