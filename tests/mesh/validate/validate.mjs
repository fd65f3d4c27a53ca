// Validates the Gateway API and Istio documents of a JSON file (a list of Kubernetes objects)
// with @kubernetes-models: `new Model(doc).validate()` checks types, enums, patterns and required
// fields. It lets unknown fields pass, so strict.mjs checks those. Other API groups are skipped.
// Usage: node validate.mjs DOCS.json   (exit 1 if any document is invalid or of an unknown kind)
import fs from "node:fs";
import * as gateway from "@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1";
import * as gatewayBeta from "@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1beta1";
import * as istio from "@kubernetes-models/istio/networking.istio.io/v1";
import * as istioAlpha from "@kubernetes-models/istio/networking.istio.io/v1alpha3";

export const MODELS = {
  "gateway.networking.k8s.io/v1": gateway,
  "gateway.networking.k8s.io/v1beta1": gatewayBeta,
  "networking.istio.io/v1": istio,
  "networking.istio.io/v1alpha3": istioAlpha,
};

let invalid = 0;
let valid = 0;
for (const doc of JSON.parse(fs.readFileSync(process.argv[2], "utf8"))) {
  const group = MODELS[doc.apiVersion];
  if (!group) continue;
  const where = `${doc.apiVersion} ${doc.kind} ${doc.metadata?.namespace}/${doc.metadata?.name}`;
  const Model = group[doc.kind];
  if (!Model) {
    console.log(`UNKNOWN KIND ${where}`);
    invalid++;
    continue;
  }
  try {
    new Model(doc).validate();
    console.log(`valid ${where}`);
    valid++;
  } catch (error) {
    console.log(`INVALID ${where}\n  ${error.message.split("\n").join("\n  ")}`);
    invalid++;
  }
}
console.log(`${valid} valid, ${invalid} invalid`);
process.exit(invalid ? 1 : 0);
