// The strict half of the check: each Gateway API and Istio document becomes a TypeScript object
// literal typed with its model's interface, and tsc's excess-property check rejects any field
// the API does not have (a misspelt `timeoutz` passes validate() but not this).
// Usage: node strict.mjs DOCS.json WORKDIR   (exit 1 on any unknown or mistyped field)
import fs from "node:fs";
import path from "node:path";
import { execFileSync } from "node:child_process";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const modules = {
  "gateway.networking.k8s.io/v1": "@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1",
  "gateway.networking.k8s.io/v1beta1": "@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1beta1",
  "networking.istio.io/v1": "@kubernetes-models/istio/networking.istio.io/v1",
  "networking.istio.io/v1alpha3": "@kubernetes-models/istio/networking.istio.io/v1alpha3",
};
const [docsFile, workdir] = process.argv.slice(2);
let source = "";
let count = 0;
for (const doc of JSON.parse(fs.readFileSync(docsFile, "utf8"))) {
  const module = modules[doc.apiVersion];
  if (!module) continue;
  source += `import type { I${doc.kind} as T${count} } from "${module}/${doc.kind}";\n`;
  source += `// ${doc.kind} ${doc.metadata.namespace}/${doc.metadata.name}\n`;
  source += `export const d${count}: T${count} = ${JSON.stringify(doc, null, 1)};\n`;
  count++;
}
// tsc resolves the models from this directory's node_modules.
const checked = path.join(here, `strict-check-${process.pid}.ts`);
fs.writeFileSync(checked, source);
fs.copyFileSync(checked, path.join(workdir, "strict-check.ts"));  // kept for reading errors
try {
  execFileSync(
    process.execPath,
    [path.join(here, "node_modules/typescript/bin/tsc"), "--noEmit", "--strict", "--skipLibCheck",
     "--module", "nodenext", "--moduleResolution", "nodenext", "--target", "es2022", checked],
    { stdio: "inherit" },
  );
  console.log(`${count} documents: no unknown or mistyped fields`);
} catch {
  console.log("unknown or mistyped fields (tsc above; the checked file is strict-check.ts)");
  process.exitCode = 1;
} finally {
  fs.rmSync(checked);
}
