// Validate Kubernetes objects (a JSON array on stdin) against their CRDs' OpenAPI schemas, as packaged
// by @kubernetes-models/* (AJV validators compiled from the CRDs). Prints a JSON array: one entry per
// object, {kind, name, error} (error null when valid). Objects of a kind no package models are refused.
import { readFileSync } from "node:fs";

const MODELS = {
  "cert-manager.io/v1": "@kubernetes-models/cert-manager/cert-manager.io/v1",
  "keda.sh/v1alpha1": "@kubernetes-models/keda/keda.sh/v1alpha1",
  "monitoring.coreos.com/v1": "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1",
};

const objects = JSON.parse(readFileSync(0, "utf8"));
const out = [];
for (const obj of objects) {
  const name = obj.metadata?.name;
  const base = MODELS[obj.apiVersion];
  if (!base) {
    out.push({ kind: obj.kind, name, error: `no model for apiVersion ${obj.apiVersion}` });
    continue;
  }
  let cls;
  try {
    cls = (await import(`${base}/${obj.kind}`))[obj.kind];
  } catch (e) {
    out.push({ kind: obj.kind, name, error: `no model for ${obj.apiVersion} ${obj.kind}: ${e.message}` });
    continue;
  }
  try {
    new cls(obj).validate();
    out.push({ kind: obj.kind, name, error: null });
  } catch (e) {
    out.push({ kind: obj.kind, name, error: e.message });
  }
}
process.stdout.write(JSON.stringify(out));
