// Validates the custom resources of a multi-document YAML stream read from stdin (the output of
// `kubectl kustomize deploy/k8s/overlays/<env>`) against the operators' CRD schemas, as compiled
// into the @kubernetes-models packages pinned in package.json (versions: tests/deploy/README.md).
//
//   node tests/deploy/crd/validate.mjs built.yaml      (what tests/deploy/conftest.py runs)
//   kubectl kustomize deploy/k8s/overlays/dev | node tests/deploy/crd/validate.mjs
//
// Stdin is read as a stream: `readFileSync(0)` fails with EAGAIN on Node 18 (Debian bookworm's
// nodejs) when stdin is a non-blocking pipe. Node >= 20 is required (tests/deploy/README.md).
//
// Prints one JSON line per document:
//   {"index": 3, "apiVersion": "kafka.strimzi.io/v1", "kind": "KafkaTopic", "name": "...",
//    "status": "ok" | "invalid" | "skipped", "errors": [...], "unknownFields": [...]}
// "skipped" = not a custom resource of the groups below (the Kubernetes kinds are validated by
// kubernetes-validate on the Python side). Exits 1 when any document is invalid, has a field
// the schema does not declare, or is of a custom group with an apiVersion/kind the packages do
// not know; 2 when the input cannot be read at all.
//
// Unknown fields: the CRD schemas do not set additionalProperties: false (the API server prunes
// unknown fields silently instead), so the compiled validators accept them. To catch them
// anyway, every object is wrapped in a Proxy that records which property names the validator
// looks up and whether it enumerates the object's keys. A validator checks every property its
// schema declares (present or not), and enumerates the keys of map-like objects (labels,
// additionalProperties). So a key of an object whose schema declares properties, that the
// validator neither looked up nor enumerated, is a field the schema does not know. Objects the
// validator never looks into (x-kubernetes-preserve-unknown-fields, e.g. KafkaTopic.spec.config)
// are free-form and pass.
import { readFile } from "node:fs/promises";
import { parseAllDocuments } from "yaml";

const PACKAGES = {
  "kafka.strimzi.io": "@kubernetes-models/strimzi-kafka-operator",
  "core.strimzi.io": "@kubernetes-models/strimzi-kafka-operator",
  "postgresql.cnpg.io": "@kubernetes-models/cloudnative-pg",
  "monitoring.coreos.com": "@kubernetes-models/prometheus-operator",
};

const modules = new Map();

async function loadModel(apiVersion, kind) {
  const [group, version] = apiVersion.includes("/") ? apiVersion.split("/", 2) : ["", apiVersion];
  const pkg = PACKAGES[group];
  if (!pkg) return { custom: false };
  const spec = `${pkg}/${group}/${version}`;
  if (!modules.has(spec)) {
    try {
      modules.set(spec, await import(spec));
    } catch (e) {
      modules.set(spec, null);
    }
  }
  const mod = modules.get(spec);
  if (!mod) return { custom: true, error: `unknown apiVersion ${apiVersion} (no ${spec} in ${pkg})` };
  const Model = mod[kind];
  if (typeof Model !== "function" || Model.kind !== kind || Model.apiVersion !== apiVersion) {
    return { custom: true, error: `unknown kind ${kind} in ${apiVersion}` };
  }
  return { custom: true, Model };
}

// Wraps value (recursively) so that the validator's look-ups are recorded in `records`.
function track(value, path, records) {
  if (Array.isArray(value)) {
    return value.map((item, i) => track(item, `${path}/${i}`, records));
  }
  if (value === null || typeof value !== "object") return value;
  const rec = { path, keys: Object.keys(value), read: new Set(), enumerated: false };
  records.push(rec);
  const target = {};
  for (const [k, v] of Object.entries(value)) target[k] = track(v, `${path}/${k}`, records);
  const note = (p) => {
    if (typeof p === "string") rec.read.add(p);
  };
  return new Proxy(target, {
    get(t, p, r) {
      note(p);
      return Reflect.get(t, p, r);
    },
    has(t, p) {
      note(p);
      return Reflect.has(t, p);
    },
    getOwnPropertyDescriptor(t, p) {
      note(p);
      return Reflect.getOwnPropertyDescriptor(t, p);
    },
    ownKeys(t) {
      rec.enumerated = true;
      return Reflect.ownKeys(t);
    },
  });
}

function unknownFields(records) {
  const out = [];
  for (const rec of records) {
    if (rec.enumerated || rec.read.size === 0) continue; // a map, or a free-form object
    for (const key of rec.keys) {
      if (!rec.read.has(key)) out.push(`${rec.path}/${key}`);
    }
  }
  return out;
}

async function readStdin() {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(typeof chunk === "string" ? Buffer.from(chunk) : chunk);
  return Buffer.concat(chunks).toString("utf8");
}

async function main() {
  const path = process.argv[2];
  let text;
  try {
    text = path && path !== "-" ? await readFile(path, "utf8") : await readStdin();
  } catch (e) {
    console.error(`cannot read ${path && path !== "-" ? path : "stdin"}: ${e.message}`);
    return 2;
  }
  let rc = 0;
  const docs = parseAllDocuments(text);
  for (const [index, doc] of (Array.isArray(docs) ? docs : [docs]).entries()) {
    const line = { index, apiVersion: null, kind: null, name: null, status: "ok", errors: [], unknownFields: [] };
    if (doc.errors && doc.errors.length) {
      line.status = "invalid";
      line.errors = doc.errors.map((e) => `YAML: ${e.message}`);
      rc = 1;
      console.log(JSON.stringify(line));
      continue;
    }
    const obj = doc.toJS();
    if (obj === null || obj === undefined) continue; // an empty document
    Object.assign(line, { apiVersion: obj.apiVersion ?? null, kind: obj.kind ?? null, name: obj.metadata?.name ?? null });
    if (typeof obj.apiVersion !== "string" || typeof obj.kind !== "string") {
      line.status = "invalid";
      line.errors.push("no apiVersion or kind");
    } else {
      const found = await loadModel(obj.apiVersion, obj.kind);
      if (!found.custom) {
        line.status = "skipped";
      } else if (found.error) {
        line.status = "invalid";
        line.errors.push(found.error);
      } else {
        const records = [];
        const tracked = track(obj, "", records);
        try {
          // Model.prototype.validate runs the compiled schema on `this`: the tracked copy.
          found.Model.prototype.validate.call(tracked);
        } catch (e) {
          line.errors.push(...(e.errors ?? [{ instancePath: "", message: e.message }]).map(
            (err) => `${err.instancePath || "/"} ${err.message}${err.params ? " " + JSON.stringify(err.params) : ""}`,
          ));
        }
        line.unknownFields = unknownFields(records).filter((p) => !p.startsWith("/status"));
        if (line.errors.length || line.unknownFields.length) line.status = "invalid";
      }
    }
    if (line.status === "invalid") rc = 1;
    console.log(JSON.stringify(line));
  }
  return rc;
}

process.exitCode = await main();
