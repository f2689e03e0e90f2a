// facerec demo page: two photos -> POST /v1/verify -> boxes, landmarks, aligned crops, scores.
// Also the helpers the gallery tab (gallery.js) shares: the one request function, the key, the
// error sentences and the face report. No framework, no build step, nothing loaded from elsewhere
// (the page's CSP allows only this origin). Server text is only ever inserted with textContent.
"use strict";

(function () {
  // The service's 112x112 ArcFace template (facerec/data/align.py, ARCFACE_TEMPLATE), (x, y) in
  // pixels: left eye, right eye, nose tip, left and right mouth corners (the viewer's left first).
  const TEMPLATE = [
    [38.2946, 51.6963],
    [73.5318, 51.5014],
    [56.0252, 71.7366],
    [41.5493, 92.3655],
    [70.7299, 92.2041],
  ];
  const CROP = 112;
  const MAX_CANVAS = 640; // originals are drawn at most this wide or high
  const KEY_STORAGE = "facerec-demo-api-key"; // sessionStorage only, and only when asked
  const SIDES = ["a", "b"];
  // details.field of an error -> the words for it on the page
  const LABEL = { image_a: "photo A", image_b: "photo B", image: "the photo", images: "a photo" };

  // Least-squares similarity (rotation, uniform scale, shift) taking `src` points onto `dst`.
  // In 2-D this is Umeyama's solution written with complex numbers: with both sets centred,
  // s*R = sum(conj(z) * w) / sum(|z|^2). Returns [p, q, tx, ty]: x' = p x - q y + tx,
  // y' = q x + p y + ty (the first two rows of the service's 2x3 matrix are [p, -q, tx], [q, p, ty]).
  function similarityTransform(src, dst) {
    const n = src.length;
    let sx = 0, sy = 0, dx = 0, dy = 0;
    for (let i = 0; i < n; i++) {
      sx += src[i][0]; sy += src[i][1]; dx += dst[i][0]; dy += dst[i][1];
    }
    sx /= n; sy /= n; dx /= n; dy /= n;
    let re = 0, im = 0, norm = 0;
    for (let i = 0; i < n; i++) {
      const zx = src[i][0] - sx, zy = src[i][1] - sy;
      const wx = dst[i][0] - dx, wy = dst[i][1] - dy;
      re += zx * wx + zy * wy; // Re(conj(z) * w)
      im += zx * wy - zy * wx; // Im(conj(z) * w)
      norm += zx * zx + zy * zy;
    }
    if (norm === 0) throw new Error("degenerate landmarks");
    const p = re / norm, q = im / norm;
    return [p, q, dx - (p * sx - q * sy), dy - (q * sx + p * sy)];
  }

  // A readable message for a failed request: what happened, what to do, and the request id.
  function describeError(status, body, retryAfter) {
    const err = (body && body.error) || {};
    const details = err.details || {};
    const where = LABEL[details.field] || "a photo";
    const server = err.message ? ` (service: ${err.message})` : "";
    let text;
    if (status === 0) {
      text = "Could not reach the service. Is it running, and is this page served by it?";
    } else if (status === 401) {
      text = "The API key was refused (401). Check the key and try again.";
    } else if (status === 404) {
      text = "Not found (404): it may have been deleted. Reload the list and try again.";
    } else if (status === 409 && err.code === "contract_mismatch") {
      text = "This gallery was built with another model than the one the service runs (409): " +
        "its faces cannot be compared with new ones.";
    } else if (status === 409) {
      text = "That conflicts with what the service holds (409).";
    } else if (status === 413) {
      const limit = details.limit_bytes ? ` The limit is ${formatBytes(details.limit_bytes)}.` : "";
      text = `The upload is too large (413): ${where} is bigger than the service accepts.${limit}`;
    } else if (status === 422 && err.code === "no_face") {
      text = `No face found in ${where} (422). Try a photo where the face is larger, sharper ` +
        "and turned towards the camera.";
    } else if (status === 422 && err.code === "too_many_faces") {
      text = `Too many faces in ${where} (422): ${details.faces_found} found, the limit is ` +
        `${details.limit}. Crop the photo to fewer people.`;
    } else if (status === 422 && err.code === "decode_error") {
      text = `${capitalise(where)} could not be read as an image (422).`;
    } else if (status === 422 && err.code === "threshold_required") {
      text = "The model has no calibrated threshold for this (422): the operator must set one.";
    } else if (status === 422) {
      text = "The service could not use the request (422).";
    } else if (status === 429) {
      const wait = retryAfter ? ` in ${retryAfter} s` : " shortly";
      text = `The service is busy (429). Try again${wait}.`;
    } else if (status === 503) {
      text = "The service is not ready (503): it is warming up or shutting down. Try again shortly.";
    } else {
      text = `The request failed with status ${status}.`;
    }
    const id = body && body.request_id ? ` Request id: ${body.request_id}.` : "";
    return text + server + id;
  }

  function formatBytes(n) {
    return n >= 1048576 ? `${(n / 1048576).toFixed(1)} MiB` : `${Math.round(n / 1024)} KiB`;
  }

  function capitalise(s) {
    return s.charAt(0).toUpperCase() + s.slice(1);
  }

  function fmt(x, digits) {
    return x === null || x === undefined ? "n/a" : Number(x).toFixed(digits);
  }

  // Every request the page makes: to this origin, the key only in a header, no cookies, no cache.
  // Resolves to { ok, status, body, retryAfter }; status 0 when the service could not be reached.
  async function callApi(path, key, init) {
    let response;
    try {
      response = await fetch(path, {
        ...init, headers: { ...(init && init.headers), "X-API-Key": key },
        credentials: "omit", cache: "no-store", referrerPolicy: "no-referrer",
      });
    } catch (_) {
      return { ok: false, status: 0, body: null, retryAfter: null };
    }
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      body = null;
    }
    return { ok: response.ok && body !== null, status: response.status, body,
             retryAfter: response.headers.get("Retry-After") };
  }

  // The typed API key, or "" after telling the visitor to type one (shown by `showError`).
  function requireKey(showError) {
    const input = document.getElementById("api-key");
    const key = input.value.trim();
    if (!key) {
      showError("Type the API key first (ask the service's operator for one).");
      input.focus();
    }
    return key;
  }

  // One face's report (an ImageReport of the API) as rows of `dl`; `which`: the face that was used.
  function fillReport(dl, image, which) {
    dl.replaceChildren();
    const row = (term, value, cls) => {
      const dt = document.createElement("dt");
      dt.textContent = term;
      const dd = document.createElement("dd");
      dd.textContent = value;
      if (cls) dd.className = cls;
      dd.dataset.field = term.toLowerCase().split(" ")[0];
      dl.append(dt, dd);
    };
    const found = image.faces_found;
    row("Faces found", found > 1 ? `${found} (${which})` : String(found));
    row("Detection score", fmt(image.face.score, 3));
    const q = image.quality;
    if (!q) row("Quality", "not reported by this model");
    else if (q.score === null) row("Quality", `raw ${fmt(q.raw, 4)} (no percentile calibration)`);
    else row("Quality", `${fmt(q.score, 1)} / 100 (percentile; raw ${fmt(q.raw, 4)})`);
    const o = image.ood;
    if (!o) row("OOD check", "no OOD detector loaded");
    else if (o.flagged === null) row("OOD check", `score ${fmt(o.score, 3)} (no calibrated threshold)`);
    else if (o.flagged) {
      row("OOD check", `flagged: score ${fmt(o.score, 3)} < threshold ${fmt(o.threshold, 3)}`, "bad");
    } else {
      row("OOD check", `passed: score ${fmt(o.score, 3)} \u2265 threshold ${fmt(o.threshold, 3)}`, "good");
    }
    dl.hidden = false;
  }

  const OOD_CAUTION = "looks out of distribution (not a genuine face photo, or manipulated). The " +
    "decision above does not take this into account.";

  // The pure helpers (the page's tests check them against the service's own maths), and what the
  // gallery tab shares.
  window.facerecDemo = {
    TEMPLATE, similarityTransform, describeError, callApi, requireKey, fillReport, fmt, formatBytes,
    OOD_CAUTION,
  };

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }

  function start() {
    const $ = (id) => document.getElementById(id);
    // ticket: bumped by every new photo or request, so a late answer never shows up next to
    // photos it was not computed from.
    const state = {
      files: { a: null, b: null }, bitmaps: { a: null, b: null }, loading: { a: false, b: false },
      busy: false, ticket: 0,
    };
    const keyInput = $("api-key");
    const remember = $("remember-key");
    const compare = $("compare");

    const stored = sessionStorage.getItem(KEY_STORAGE);
    if (stored) {
      keyInput.value = stored;
      remember.checked = true;
    }
    remember.addEventListener("change", saveKey);
    keyInput.addEventListener("input", saveKey);

    function saveKey() {
      if (remember.checked && keyInput.value) sessionStorage.setItem(KEY_STORAGE, keyInput.value);
      else sessionStorage.removeItem(KEY_STORAGE);
    }

    for (const side of SIDES) {
      const input = $(`file-${side}`);
      const drop = $(`drop-${side}`);
      input.addEventListener("change", () => {
        if (input.files && input.files[0]) choose(side, input.files[0]);
      });
      drop.addEventListener("dragover", (e) => {
        e.preventDefault();
        e.dataTransfer.dropEffect = "copy";
        drop.classList.add("over");
      });
      drop.addEventListener("dragleave", () => drop.classList.remove("over"));
      drop.addEventListener("drop", (e) => {
        e.preventDefault();
        drop.classList.remove("over");
        const file = e.dataTransfer && e.dataTransfer.files && e.dataTransfer.files[0];
        if (file) choose(side, file);
      });
    }
    // A file dropped next to a drop zone must not make the browser navigate away to it.
    window.addEventListener("dragover", (e) => e.preventDefault());
    window.addEventListener("drop", (e) => e.preventDefault());

    $("verify-form").addEventListener("submit", (e) => {
      e.preventDefault();
      verify();
    });

    async function choose(side, file) {
      state.ticket++;
      state.files[side] = file;
      state.bitmaps[side] = null;
      state.loading[side] = true;
      $(`drop-${side}`).dataset.state = "loading";
      updateButton();
      $(`name-${side}`).textContent = `${file.name} (${formatBytes(file.size)})`;
      $(`report-${side}`).hidden = true;
      clearResult();
      try {
        // from-image: the same EXIF rotation the service applies before it reports boxes.
        const bitmap = await createImageBitmap(file, { imageOrientation: "from-image" });
        if (state.files[side] === file) {
          state.bitmaps[side] = bitmap;
          drawOriginal(side, null);
          $(`drop-${side}`).dataset.state = "ready";
        }
      } catch (err) {
        // The browser cannot preview it; the service may still decode it (or say why not).
        if (state.files[side] === file) {
          $(`canvas-${side}`).hidden = true;
          $(`drop-${side}`).dataset.state = "unreadable";
        }
      } finally {
        if (state.files[side] === file) state.loading[side] = false;
        updateButton();
      }
    }

    function updateButton() {
      const loading = state.loading.a || state.loading.b;
      compare.disabled = state.busy || loading || !(state.files.a && state.files.b);
    }

    function clearResult() {
      $("result").hidden = true;
      $("error").hidden = true;
      $("error").textContent = "";
    }

    function showError(text) {
      $("result").hidden = true;
      const box = $("error");
      box.textContent = text;
      box.hidden = false;
    }

    async function verify() {
      clearResult();
      const key = requireKey(showError);
      if (!key) return;
      const form = new FormData();
      form.append("image_a", state.files.a, state.files.a.name);
      form.append("image_b", state.files.b, state.files.b.name);
      const ticket = ++state.ticket;
      state.busy = true;
      updateButton();
      $("status").textContent = "Comparing\u2026";
      const answer = await callApi("/v1/verify", key, { method: "POST", body: form });
      state.busy = false;
      updateButton();
      $("status").textContent = "";
      if (ticket !== state.ticket) return; // a photo changed while this request was running
      if (!answer.ok) {
        showError(describeError(answer.status, answer.body, answer.retryAfter));
        return;
      }
      showResult(answer.body);
    }

    function showResult(r) {
      const decision = $("decision");
      decision.dataset.decision = r.decision;
      decision.className = `decision ${r.decision}`;
      decision.textContent = r.match ? "Match: the same person" : "No match: different people";
      const sim = $("similarity");
      sim.textContent = fmt(r.similarity, 4);
      sim.dataset.value = String(r.similarity);
      $("threshold").textContent = fmt(r.threshold, 4);
      $("operating-point").textContent = operatingPoint(r.operating_point);
      $("model-info").textContent = r.contract_id;
      const flagged = [];
      for (const side of SIDES) {
        const image = r[`image_${side}`];
        drawOriginal(side, image.face);
        drawCrop(side, image.face);
        fillReport($(`report-${side}`), image, "the largest is compared");
        if (image.ood && image.ood.flagged) flagged.push(`photo ${side.toUpperCase()}`);
      }
      const warning = $("ood-warning");
      warning.hidden = flagged.length === 0;
      warning.textContent = flagged.length ? `Caution: ${flagged.join(" and ")} ${OOD_CAUTION}` : "";
      $("result").hidden = false;
    }

    function operatingPoint(op) {
      if (!op) return "n/a";
      if (op.source === "request") return "threshold sent with the request";
      if (op.source === "setting") return "threshold set by the operator (FACEREC_VERIFY_THRESHOLD)";
      const far = op.far === null || op.far === undefined ? "" : `false accept rate ${op.far}, `;
      return `${far}calibrated on ${op.calibrated_on || "unknown data"}`;
    }

    function drawOriginal(side, face) {
      const bitmap = state.bitmaps[side];
      const canvas = $(`canvas-${side}`);
      if (!bitmap) {
        canvas.hidden = true;
        return;
      }
      const scale = Math.min(1, MAX_CANVAS / Math.max(bitmap.width, bitmap.height));
      canvas.width = Math.round(bitmap.width * scale);
      canvas.height = Math.round(bitmap.height * scale);
      const ctx = canvas.getContext("2d");
      ctx.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
      canvas.hidden = false;
      canvas.setAttribute("aria-label", `Photo ${side.toUpperCase()}` +
        (face ? " with the compared face outlined" : ""));
      if (!face) return;
      const line = Math.max(2, Math.round(Math.max(canvas.width, canvas.height) / 160));
      const [x1, y1, x2, y2] = face.box.map((v) => v * scale);
      ctx.lineWidth = line;
      ctx.strokeStyle = "#00c853";
      ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
      ctx.fillStyle = "#ff1744";
      for (const [x, y] of face.landmarks) {
        ctx.beginPath();
        ctx.arc(x * scale, y * scale, line * 1.2, 0, 2 * Math.PI);
        ctx.fill();
      }
    }

    function drawCrop(side, face) {
      const canvas = $(`crop-${side}`);
      const ctx = canvas.getContext("2d");
      ctx.setTransform(1, 0, 0, 1, 0, 0);
      ctx.fillStyle = "#000"; // the service pads with black outside the photo as well
      ctx.fillRect(0, 0, CROP, CROP);
      const bitmap = state.bitmaps[side];
      if (!bitmap) return;
      const [p, q, tx, ty] = similarityTransform(face.landmarks, TEMPLATE);
      ctx.imageSmoothingEnabled = true;
      ctx.setTransform(p, q, -q, p, tx, ty);
      ctx.drawImage(bitmap, 0, 0);
      ctx.setTransform(1, 0, 0, 1, 0, 0);
    }

    updateButton();
  }
})();
