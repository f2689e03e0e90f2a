// facerec demo page, the tabs and the gallery tab: create or pick a gallery, enroll a person (the
// enrollment gate's answer for every photo), search (the closest persons and the open-set
// decision). Requests, errors and face reports go through app.js's helpers (window.facerecDemo);
// the same rules hold: this origin only, the key only in a header, server text only as textContent.
"use strict";

(function () {
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }

  function start() {
    const demo = window.facerecDemo;
    const $ = (id) => document.getElementById(id);
    // ticket: bumped by every request and by every change of gallery, so an answer is shown only
    // next to the gallery and the inputs it was computed for.
    const state = { galleries: new Map(), busy: false, ticket: 0, loaded: false };

    setupTabs(() => {
      if (!state.loaded && $("api-key").value.trim()) loadGalleries(null);
    });

    $("gallery-load").addEventListener("click", () => loadGalleries(currentId()));
    $("gallery-create").addEventListener("click", createGallery);
    $("gallery-select").addEventListener("change", () => {
      state.ticket++;
      clearAnswers();
      showGalleryInfo();
      updateButtons();
    });
    $("enroll").addEventListener("click", enroll);
    $("search").addEventListener("click", search);
    for (const id of ["gallery-name", "person-name"]) $(id).addEventListener("input", updateButtons);
    $("enroll-files").addEventListener("change", updateButtons);
    $("search-file").addEventListener("change", () => {
      $("search-result").hidden = true; // a new photo clears the old answer
      updateButtons();
    });

    function currentId() {
      return $("gallery-select").value || null;
    }

    function current() {
      return state.galleries.get(currentId()) || null;
    }

    function updateButtons() {
      const g = current();
      const usable = Boolean(g && g.usable);
      $("gallery-create").disabled = state.busy || !$("gallery-name").value.trim();
      $("gallery-load").disabled = state.busy;
      $("enroll").disabled = state.busy || !usable || !$("person-name").value.trim() ||
        $("enroll-files").files.length === 0;
      $("search").disabled = state.busy || !usable || $("search-file").files.length === 0;
    }

    function showError(text) {
      const box = $("gallery-error");
      box.textContent = text;
      box.hidden = false;
    }

    // The error and the given answers ("enroll-result", "search-result"; default both).
    function clearAnswers(...ids) {
      $("gallery-error").hidden = true;
      $("gallery-error").textContent = "";
      for (const id of ids.length ? ids : ["enroll-result", "search-result"]) $(id).hidden = true;
    }

    // One request with the busy state, the status line and the ticket; the answer (or null when
    // the key is missing or a newer action made it stale) and any failure shown as a sentence.
    async function request(path, init, statusId, statusText) {
      $("gallery-error").hidden = true;
      const key = demo.requireKey(showError);
      if (!key) return null;
      const ticket = ++state.ticket;
      state.busy = true;
      updateButtons();
      if (statusId) $(statusId).textContent = statusText;
      const answer = await demo.callApi(path, key, init);
      state.busy = false;
      updateButtons();
      if (statusId) $(statusId).textContent = "";
      if (ticket !== state.ticket) return null;
      if (!answer.ok && !(answer.body && answer.body.error && answer.body.error.code === "enrollment_refused")) {
        showError(demo.describeError(answer.status, answer.body, answer.retryAfter));
      }
      return answer;
    }

    // ------------------------------------------------------------------ galleries
    async function loadGalleries(selectId) {
      const answer = await request("/v1/galleries", { method: "GET" }, null, "");
      if (!answer || !answer.ok) return;
      state.loaded = true;
      state.galleries = new Map(answer.body.galleries.map((g) => [g.id, g]));
      const select = $("gallery-select");
      select.replaceChildren();
      const none = new Option(state.galleries.size ? "(choose a gallery)" : "(no gallery yet: create one)", "");
      select.append(none);
      for (const g of state.galleries.values()) {
        select.append(new Option(`${g.name} (${g.persons} ${g.persons === 1 ? "person" : "persons"})`, g.id));
      }
      select.value = selectId && state.galleries.has(selectId) ? selectId : "";
      state.ticket++;
      showGalleryInfo();
      updateButtons();
    }

    async function createGallery() {
      clearAnswers();
      const name = $("gallery-name").value.trim();
      const answer = await request("/v1/galleries", {
        method: "POST", body: JSON.stringify({ name }), headers: { "Content-Type": "application/json" },
      }, null, "");
      if (!answer || !answer.ok) return;
      $("gallery-name").value = "";
      await loadGalleries(answer.body.id);
    }

    async function refreshGallery(id) {
      const answer = await request(`/v1/galleries/${id}`, { method: "GET" }, null, "");
      if (!answer || !answer.ok) return;
      state.galleries.set(id, answer.body);
      const option = [...$("gallery-select").options].find((o) => o.value === id);
      const g = answer.body;
      if (option) option.text = `${g.name} (${g.persons} ${g.persons === 1 ? "person" : "persons"})`;
      showGalleryInfo();
    }

    function showGalleryInfo() {
      const info = $("gallery-info");
      const g = current();
      info.dataset.galleryId = g ? g.id : "";
      if (!g) {
        info.textContent = "No gallery chosen.";
        return;
      }
      const counts = `${g.persons} ${g.persons === 1 ? "person" : "persons"}, ${g.samples} ` +
        `${g.samples === 1 ? "sample" : "samples"}.`;
      if (!g.usable) {
        info.textContent = `${counts} Built with another model (${g.model_name}, contract ` +
          `${g.contract_id}) than the service runs: it cannot be enrolled into or searched.`;
      } else if (!g.operating_point) {
        info.textContent = `${counts} No match threshold: the model has no open-set calibration ` +
          "(set the gallery's match_threshold through the API).";
      } else {
        info.textContent = `${counts} Match threshold ${demo.fmt(g.operating_point.threshold, 4)}: ` +
          operatingPoint(g.operating_point);
      }
    }

    // The open-set operating point (OperatingPointOut) in words.
    function operatingPoint(op) {
      if (op.source === "request") return "sent with the request.";
      if (op.source === "gallery") return "the gallery's fixed threshold.";
      const how = op.calibration_method === "pairs" ? "extrapolated from impostor pairs" : "validation searches";
      const beyond = op.beyond_calibration ? " The gallery is larger than any calibrated size: the " +
        "false-positive rate may be higher than stated." : "";
      return `false-positive identification rate ${op.fpir} at a gallery of ` +
        `${op.calibrated_gallery_size} samples (this one: ${op.gallery_size}), from ${how} on ` +
        `${op.calibrated_on || "unknown data"}.${beyond}`;
    }

    // ------------------------------------------------------------------ enroll
    async function enroll() {
      clearAnswers("enroll-result");
      const g = current();
      const files = [...$("enroll-files").files];
      const form = new FormData();
      form.append("name", $("person-name").value.trim());
      for (const f of files) form.append("images", f, f.name);
      const answer = await request(`/v1/galleries/${g.id}/persons`, { method: "POST", body: form },
        "enroll-status", "Enrolling\u2026");
      if (!answer) return;
      if (answer.ok) {
        showEnrollment(answer.body, files);
        $("person-name").value = ""; // ready for the next person
        $("enroll-files").value = "";
        updateButtons();
      } else if (answer.body && answer.body.error && answer.body.error.code === "enrollment_refused") {
        showEnrollment({ person: null, results: answer.body.error.details.results }, files);
      } else {
        return;
      }
      await refreshGallery(g.id);
    }

    function showEnrollment(body, files) {
      const summary = $("enroll-summary");
      const n = body.results.length;
      if (body.person) {
        summary.dataset.outcome = "enrolled";
        summary.textContent = `Enrolled ${body.person.name} with ${body.enrolled} of ${n} ` +
          `${n === 1 ? "photo" : "photos"} (person id ${body.person.id}).`;
      } else {
        summary.dataset.outcome = "refused";
        summary.textContent = "Nobody was enrolled: no photo passed the gallery's enrollment gate.";
      }
      const list = $("enroll-outcomes");
      list.replaceChildren();
      for (const r of body.results) {
        const item = document.createElement("li");
        item.dataset.status = r.status;
        const head = document.createElement("span");
        const name = files[r.index] ? files[r.index].name : `photo ${r.index + 1}`;
        head.textContent = `${name}: ${r.status}`;
        head.className = r.status === "enrolled" ? "good" : "bad";
        item.append(head);
        const reasons = document.createElement("ul");
        for (const reason of r.reasons || []) {
          const li = document.createElement("li");
          li.dataset.code = reason.code;
          li.textContent = `${reason.message} (${reason.code})`; // the service's sentence and the stable code
          reasons.append(li);
        }
        if (r.error) {
          const li = document.createElement("li");
          li.dataset.code = r.error.code;
          li.textContent = `${r.error.message} (${r.error.code})`;
          reasons.append(li);
        }
        if (reasons.children.length) item.append(reasons);
        list.append(item);
      }
      $("enroll-result").hidden = false;
    }

    // ------------------------------------------------------------------ search
    async function search() {
      clearAnswers("search-result");
      const g = current();
      const file = $("search-file").files[0];
      const form = new FormData();
      form.append("image", file, file.name);
      const answer = await request(`/v1/galleries/${g.id}/search`, { method: "POST", body: form },
        "search-status", "Searching\u2026");
      if (answer && answer.ok) showSearch(answer.body);
    }

    function showSearch(r) {
      const decision = $("search-decision");
      decision.dataset.decision = r.decision;
      decision.className = `decision ${r.decision === "match" ? "match" : "no_match"}`;
      if (r.decision === "match") decision.textContent = `Match: ${r.person.name}`;
      else if (r.candidates.length === 0) decision.textContent = "Unknown: the gallery is empty";
      else decision.textContent = "Unknown: nobody in the gallery reaches the threshold";
      const sim = $("search-similarity");
      sim.textContent = r.similarity === null ? "n/a (empty gallery)" : demo.fmt(r.similarity, 4);
      sim.dataset.value = String(r.similarity);
      $("search-threshold").textContent = demo.fmt(r.threshold, 4);
      $("search-operating-point").textContent = operatingPoint(r.operating_point);
      const rows = $("candidates").tBodies[0];
      rows.replaceChildren();
      r.candidates.forEach((c, i) => {
        const tr = rows.insertRow();
        tr.dataset.personId = c.person_id;
        if (r.person && r.person.id === c.person_id) tr.className = "matched";
        for (const text of [String(i + 1), c.name, demo.fmt(c.similarity, 4), c.person_id]) {
          tr.insertCell().textContent = text;
        }
      });
      $("candidates").hidden = r.candidates.length === 0;
      demo.fillReport($("search-report"), r.image, "the largest is searched");
      const warning = $("search-ood-warning");
      const flagged = Boolean(r.image.ood && r.image.ood.flagged);
      warning.hidden = !flagged;
      warning.textContent = flagged ? `Caution: the photo ${demo.OOD_CAUTION}` : "";
      $("search-result").hidden = false;
    }

    updateButtons();
  }

  // WAI-ARIA tabs: click or arrow keys; only the selected tab is in the Tab order.
  function setupTabs(onGallery) {
    const tabs = [...document.querySelectorAll('[role="tab"]')];
    const select = (tab) => {
      for (const t of tabs) {
        const on = t === tab;
        t.setAttribute("aria-selected", String(on));
        t.tabIndex = on ? 0 : -1;
        document.getElementById(t.getAttribute("aria-controls")).hidden = !on;
      }
      if (tab.id === "tab-gallery") onGallery();
    };
    tabs.forEach((tab, i) => {
      tab.addEventListener("click", () => select(tab));
      tab.addEventListener("keydown", (e) => {
        const next = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 }[e.key];
        if (next === undefined) return;
        e.preventDefault();
        const target = tabs[(next + tabs.length) % tabs.length];
        select(target);
        target.focus();
      });
    });
  }
})();
