// Validate Argo CD Application and AppProject manifests against the schemas generated from the
// Argo CD CRDs (npm @kubernetes-models/argo-cd). Usage: node argocd-validate.cjs FILE.json...
// Each FILE holds a JSON array of objects (validate.sh converts the YAML with PyYAML).
"use strict";
const fs = require("fs");
const { Application } = require("@kubernetes-models/argo-cd/argoproj.io/v1alpha1/Application");
const { AppProject } = require("@kubernetes-models/argo-cd/argoproj.io/v1alpha1/AppProject");

const models = { Application, AppProject };
let failed = 0;
let checked = 0;
for (const file of process.argv.slice(2)) {
  for (const doc of JSON.parse(fs.readFileSync(file, "utf8"))) {
    const where = `${doc.__source}: ${doc.kind}/${doc.metadata && doc.metadata.name}`;
    delete doc.__source;
    const Model = models[doc.kind];
    if (doc.apiVersion !== "argoproj.io/v1alpha1" || !Model) {
      console.error(`${where}: no Argo CD schema for ${doc.apiVersion} ${doc.kind}`);
      failed++;
      continue;
    }
    try {
      new Model(doc).validate();
      checked++;
      console.log(`ok   ${where} (argoproj.io/v1alpha1 schema)`);
    } catch (e) {
      failed++;
      console.error(`FAIL ${where}: ${e.message}`);
    }
  }
}
if (failed > 0 || checked === 0) {
  console.error(`${failed} Argo CD manifest(s) failed schema validation`);
  process.exit(1);
}
