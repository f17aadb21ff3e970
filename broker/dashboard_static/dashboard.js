// devstreams hub dashboard: keeps the server-rendered page fresh by polling /api/*.
// No framework and no build step; shipped in the package (broker/dashboard_static).
"use strict";
(function () {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const readOnly = document.querySelector('meta[name="read-only"]').content === "yes";
  const refreshMs = Number(document.querySelector('meta[name="refresh-ms"]').content) || 2000;
  const $ = (id) => document.getElementById(id);
  let devicePage = 1;

  function get(url) {
    return fetch(url, {credentials: "same-origin", cache: "no-store"}).then((r) => {
      if (r.status === 401) { location.reload(); throw new Error("logged out"); }
      if (!r.ok) throw new Error(url + ": " + r.status);
      return r.json();
    });
  }
  function post(url) {
    return fetch(url, {method: "POST", credentials: "same-origin", headers: {"X-CSRF-Token": csrf}});
  }
  function cell(row, text, cls) {
    const td = document.createElement("td");
    td.textContent = text == null ? "" : String(text);
    if (cls) td.className = cls;
    row.appendChild(td);
    return td;
  }
  function bytes(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : String(n)) + " " + units[i];
  }
  function when(t) { return t ? new Date(t * 1000).toLocaleString() : "never"; }
  function fillTimes(root) {
    root.querySelectorAll("td.time").forEach((td) => { td.textContent = when(Number(td.dataset.t) || 0); });
  }

  function drawChart(svg, values) {
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    if (values.length < 2) return;
    const max = Math.max(1, ...values);
    const step = 300 / (values.length - 1);
    const points = values.map((v, i) => (i * step).toFixed(1) + "," + (78 - (v / max) * 74).toFixed(1));
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("points", points.join(" "));
    svg.appendChild(line);
    const title = document.createElementNS("http://www.w3.org/2000/svg", "title");
    title.textContent = "max " + max;
    svg.appendChild(title);
  }

  // Rows are kept per stream id and updated in place: a Close button is never replaced under the pointer.
  function streamRow(s) {
    const tr = document.createElement("tr");
    tr.dataset.stream = s.stream_id;
    for (let i = 0; i < 7; i++) tr.appendChild(document.createElement("td"));
    if (readOnly) {                 // an operator's view: no Close (the hub refuses it anyway)
      tr.appendChild(document.createElement("td"));
      return tr;
    }
    const button = document.createElement("button");
    button.type = "button";
    button.className = "close";
    button.textContent = "Close";
    button.addEventListener("click", () => {
      if (!confirm("Close stream " + s.name + " to " + s.device + "? Both sides are disconnected.")) return;
      post("/api/streams/" + encodeURIComponent(s.stream_id) + "/close").then(() => { refresh(); loadActivity(); });
    });
    tr.appendChild(document.createElement("td")).appendChild(button);
    return tr;
  }
  function showStreams(rows) {
    const body = $("streams").tBodies[0];
    const existing = new Map();
    for (const tr of Array.from(body.rows)) existing.set(tr.dataset.stream, tr);
    rows.forEach((s, index) => {
      let tr = existing.get(s.stream_id);
      existing.delete(s.stream_id);
      if (!tr) tr = streamRow(s);
      const texts = [s.device, s.name, s.operator, s.state, Math.round(s.age_s) + " s",
                     bytes(s.bytes_to_device), bytes(s.bytes_to_service)];
      texts.forEach((text, i) => { if (tr.cells[i].textContent !== text) tr.cells[i].textContent = text; });
      if (body.rows[index] !== tr) body.insertBefore(tr, body.rows[index] || null);
    });
    for (const tr of existing.values()) tr.remove();
  }

  function refresh() {
    return get("/api/state").then((st) => {
      const s = st.summary;
      $("summary").textContent = s.devices + " devices, " + s.online + " online, " + s.open_streams + " open streams";
      showStreams(st.streams);
      drawChart($("chart-streams"), st.chart.map((p) => p.streams));
      drawChart($("chart-throughput"), st.chart.map((p) => p.bps));
    }).catch(() => {});
  }

  function loadDevices() {
    const q = encodeURIComponent($("device-filter").value);
    return get("/api/devices?q=" + q + "&page=" + devicePage).then((page) => {
      devicePage = page.page;
      const body = $("devices").tBodies[0];
      body.innerHTML = page.html;   // escaped by the hub (broker/webview.py device_rows_html)
      fillTimes(body);
      $("page-info").textContent = "page " + page.page + " of " + page.pages + " (" + page.total + " devices)";
    }).catch(() => {});
  }

  function loadActivity() {
    const q = ["device", "operator", "outcome"].map(
      (k) => k + "=" + encodeURIComponent($("activity-" + k).value)).join("&");
    return get("/api/activity?" + q).then((doc) => {
      const body = $("activity").tBodies[0];
      body.textContent = "";
      for (const a of doc.rows) {
        const tr = document.createElement("tr");
        cell(tr, when(a.time)); cell(tr, a.device); cell(tr, a.name); cell(tr, a.operator);
        cell(tr, a.outcome); cell(tr, a.reason);
        body.appendChild(tr);
      }
    }).catch(() => {});
  }

  function debounce(fn) {
    let timer = null;
    return () => { clearTimeout(timer); timer = setTimeout(fn, 250); };
  }

  $("device-filter").addEventListener("input", debounce(() => { devicePage = 1; loadDevices(); }));
  $("prev").addEventListener("click", () => { if (devicePage > 1) { devicePage--; loadDevices(); } });
  $("next").addEventListener("click", () => { devicePage++; loadDevices(); });
  for (const k of ["device", "operator", "outcome"]) {
    $("activity-" + k).addEventListener("input", debounce(loadActivity));
  }
  $("logout").addEventListener("click", () => { post("/logout").then(() => location.reload()); });

  fillTimes(document);
  refresh(); loadActivity();
  // Streams and charts every refresh; the device list and activity (database reads) every fifth.
  let tick = 0;
  setInterval(() => {
    refresh();
    if (++tick % 5 === 0) { loadDevices(); loadActivity(); }
  }, refreshMs);
})();
