// The API reference page: renders this origin's /openapi.json as plain HTML. No framework, no
// CDN (the page's CSP allows scripts and requests to this origin only); text is inserted with
// textContent, never as HTML, so nothing in the schema can inject markup.
"use strict";

const METHODS = ["get", "post", "put", "patch", "delete"];

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function resolve(schema, spec, depth = 0) {
  // Inline $ref'd components (bounded depth: schemas can be recursive).
  if (depth > 6 || schema === null || typeof schema !== "object") return schema;
  if (Array.isArray(schema)) return schema.map((s) => resolve(s, spec, depth + 1));
  if (typeof schema.$ref === "string" && schema.$ref.startsWith("#/components/schemas/")) {
    const name = schema.$ref.slice("#/components/schemas/".length);
    const target = (spec.components && spec.components.schemas || {})[name];
    return target ? resolve(target, spec, depth + 1) : schema;
  }
  const out = {};
  for (const [key, value] of Object.entries(schema)) out[key] = resolve(value, spec, depth + 1);
  return out;
}

function table(headers, rows) {
  const t = el("table");
  const head = el("tr");
  headers.forEach((h) => head.appendChild(el("th", h)));
  t.appendChild(head);
  rows.forEach((cells) => {
    const tr = el("tr");
    cells.forEach((c) => tr.appendChild(el("td", c)));
    t.appendChild(tr);
  });
  return t;
}

function operation(spec, path, method, op, index) {
  const section = el("section", null, "op");
  section.id = "op-" + index;
  const title = el("h2");
  title.appendChild(el("span", method.toUpperCase(), "method"));
  title.appendChild(document.createTextNode(" " + path));
  section.appendChild(title);
  if (op.summary) section.appendChild(el("p", op.summary));
  if (op.description && op.description !== op.summary) section.appendChild(el("p", op.description));
  const params = op.parameters || [];
  if (params.length) {
    section.appendChild(el("h3", "Parameters"));
    section.appendChild(table(["name", "in", "required", "schema"], params.map((p) => [
      p.name, p.in, p.required ? "yes" : "no", JSON.stringify(resolve(p.schema || {}, spec)),
    ])));
  }
  const body = op.requestBody && op.requestBody.content;
  if (body) {
    section.appendChild(el("h3", "Request body"));
    for (const [media, content] of Object.entries(body)) {
      section.appendChild(el("p", media));
      section.appendChild(el("pre", JSON.stringify(resolve(content.schema || {}, spec), null, 2)));
    }
  }
  const responses = op.responses || {};
  section.appendChild(el("h3", "Responses"));
  section.appendChild(table(["status", "meaning"], Object.entries(responses).map(
    ([status, r]) => [status, r.description || ""])));
  return section;
}

async function main() {
  const status = document.getElementById("status");
  let spec;
  try {
    const response = await fetch("/openapi.json", { credentials: "omit" });
    if (!response.ok) throw new Error("HTTP " + response.status);
    spec = await response.json();
  } catch (err) {
    status.textContent = "Could not load /openapi.json: " + err.message;
    return;
  }
  document.title = (spec.info && spec.info.title || "API") + " " + (spec.info && spec.info.version || "") +
    " reference";
  const ops = document.getElementById("operations");
  const toc = el("ul");
  ops.textContent = "";
  let index = 0;
  for (const [path, item] of Object.entries(spec.paths || {})) {
    for (const method of METHODS) {
      if (!item[method]) continue;
      ops.appendChild(operation(spec, path, method, item[method], index));
      const li = el("li");
      const link = el("a", method.toUpperCase() + " " + path);
      link.href = "#op-" + index;
      li.appendChild(link);
      toc.appendChild(li);
      index += 1;
    }
  }
  document.getElementById("toc").appendChild(toc);
}

main();
