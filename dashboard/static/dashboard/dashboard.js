// Argus dashboard: live updates over server-sent events (dashboard/views.py `events`), plain
// JavaScript, no dependencies. Every text from the server is set with textContent, never as HTML:
// names and messages come from tenants and devices.
(function () {
  "use strict";
  const body = document.body;
  const pingSeconds = parseFloat(body.dataset.pingSeconds || "5");
  const status = document.getElementById("live-status");
  let lastHeard = 0;

  function setState(state) {
    if (!status || status.dataset.state === state) return;
    status.dataset.state = state;
    status.textContent = state;
  }

  // --- rates: the counts of the last 10 s of events ----------------------------------------
  const WINDOW = 10;
  const counts = [];
  function addCounts(event) {
    if (!event.counts) return;
    counts.push({ time: Date.now() / 1000, messages: event.counts.messages || 0, readings: event.counts.readings || 0 });
  }
  function showRates() {
    const now = Date.now() / 1000;
    while (counts.length && counts[0].time < now - WINDOW) counts.shift();
    const span = Math.min(WINDOW, Math.max(1, now - started));
    const sum = (key) => counts.reduce((total, c) => total + c[key], 0);
    const m = document.getElementById("rate-messages");
    const r = document.getElementById("rate-readings");
    if (m) m.textContent = (sum("messages") / span).toFixed(1);
    if (r) r.textContent = (sum("readings") / span).toFixed(1);
  }
  const started = Date.now() / 1000;

  function valuesText(values) {
    return Object.keys(values).sort().map((k) => k + " " + values[k]).join("  ");
  }
  function clockTime(iso) {
    const d = new Date(iso);
    return isNaN(d) ? "" : d.toLocaleTimeString([], { hour12: false });
  }

  // --- devices ------------------------------------------------------------------------------
  function updateDevices(devices) {
    for (const id of Object.keys(devices)) {
      const row = document.querySelector('#devices tr[data-device="' + CSS.escape(id) + '"]');
      const reading = devices[id];
      if (row) {
        row.querySelector(".time").textContent = clockTime(reading.time);
        row.querySelector(".values").textContent = valuesText(reading.values);
        row.classList.remove("fresh");
        void row.offsetWidth;
        row.classList.add("fresh");
      }
      chartReading(id, reading);
    }
  }

  function presenceText(p) {
    let text = (p.online ? "online" : "offline") + " since " + clockTime(p.since);
    if (!p.online && p.reason) text += " (" + p.reason + ")";
    return text;
  }
  function updatePresence(presence) {
    for (const id of Object.keys(presence)) {
      const row = document.querySelector('#devices tr[data-device="' + CSS.escape(id) + '"]');
      if (!row) continue;
      const cell = row.querySelector(".presence");
      cell.textContent = presenceText(presence[id]);
      cell.dataset.online = presence[id].online ? "true" : "false";
    }
  }

  // --- assets: score, explanation, trend -------------------------------------------------------
  function drawTrend(svg) {
    const points = (svg.dataset.points || "").split(",").filter((p) => p !== "").map(Number);
    const line = svg.querySelector("polyline");
    if (!line || points.length === 0) return;
    const n = points.length;
    line.setAttribute("points", points.map((v, i) => (n === 1 ? 120 : (i * 120) / (n - 1)) + "," + (30 - (v * 30) / 100)).join(" "));
  }
  function updateHealth(health) {
    for (const id of Object.keys(health)) {
      const row = document.querySelector('#assets tr[data-asset="' + CSS.escape(id) + '"]');
      if (!row) continue;
      const h = health[id];
      row.querySelector(".score").textContent = h.score.toFixed(2);
      row.querySelector(".explanation summary").textContent = h.computed_by;
      row.querySelector(".explanation pre").textContent = JSON.stringify(h.explanation, null, 1);
      if (h.latest) {
        row.querySelector(".values").textContent = Object.keys(h.latest).sort()
          .map((k) => k + " " + Number(h.latest[k]).toFixed(2)).join("  ");
      }
      const svg = row.querySelector("svg.trend");
      const points = (svg.dataset.points || "").split(",").filter((p) => p !== "");
      if (points.length && Number(points[points.length - 1]) === h.score) continue;  // a rescoring, no change
      points.push(String(h.score));
      svg.dataset.points = points.slice(-120).join(",");
      drawTrend(svg);
    }
  }

  // --- alerts -------------------------------------------------------------------------------
  const alertsBody = document.querySelector("#alerts tbody");
  function alertRow(alert) {
    let row = alertsBody.querySelector('tr[data-alert="' + CSS.escape(String(alert.id)) + '"]');
    if (alert.status === "resolved") {
      if (row) row.remove();
      return;
    }
    if (!row) {
      row = document.createElement("tr");
      row.dataset.alert = String(alert.id);
      if (alert.asset) row.dataset.asset = String(alert.asset.id);
      for (const cls of ["severity", "asset", "message", "raised", "status-cell", "actions"]) {
        const cell = document.createElement("td");
        cell.className = cls;
        row.appendChild(cell);
      }
      for (const action of ["acknowledge", "resolve"]) {
        const button = document.createElement("button");
        button.dataset.action = action;
        button.textContent = action === "acknowledge" ? "Acknowledge" : "Resolve";
        row.lastChild.appendChild(button);
        row.lastChild.appendChild(document.createTextNode(" "));
      }
      alertsBody.prepend(row);
    }
    row.dataset.status = alert.status;
    const cells = row.children;
    cells[0].className = "severity " + alert.severity;
    cells[0].textContent = alert.severity;
    cells[1].textContent = (alert.asset && alert.asset.name) || alert.asset_name || "";
    cells[2].textContent = alert.message;
    cells[3].textContent = clockTime(alert.raised_at);
    cells[4].textContent = alert.status;
    row.querySelector('button[data-action="acknowledge"]').disabled = alert.status !== "open";
  }
  function updateAlerts(alerts) {
    if (!alertsBody) return;
    for (const id of Object.keys(alerts)) alertRow(alerts[id]);
    showNoAlerts();
  }
  function showNoAlerts() {
    const none = document.getElementById("alerts-none");
    if (none && alertsBody) none.hidden = alertsBody.children.length > 0;
  }
  function csrfToken() {
    const match = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
    return match ? decodeURIComponent(match[1]) : "";
  }
  if (alertsBody) {
    alertsBody.addEventListener("click", async (e) => {
      const button = e.target.closest("button[data-action]");
      if (!button) return;
      const row = button.closest("tr");
      const error = document.getElementById("action-error");
      button.disabled = true;
      const response = await fetch("/api/v1/alerts/" + encodeURIComponent(row.dataset.alert) + "/" + button.dataset.action + "/", {
        method: "POST",
        credentials: "same-origin",
        headers: { "X-CSRFToken": csrfToken(), Accept: "application/json" },
      });
      const body = await response.json().catch(() => ({}));
      if (response.ok) {
        error.hidden = true;
        alertRow(body);
        showNoAlerts();
      } else {
        error.textContent = body.detail || "The action failed (" + response.status + ").";
        error.hidden = false;
        button.disabled = false;
      }
    });
  }

  // --- the device page's chart: the last hour from the history API, then live -----------------
  const device = document.getElementById("device");
  const chart = document.getElementById("chart");
  let series = [];
  function drawChart() {
    if (!chart) return;
    const cutoff = Date.now() - 3600 * 1000;
    series = series.filter((p) => p.t >= cutoff);
    const line = chart.querySelector("polyline");
    if (series.length === 0) { line.setAttribute("points", ""); return; }
    const values = series.map((p) => p.v);
    const low = Math.min(...values), high = Math.max(...values);
    const spread = high - low || 1;
    const t0 = cutoff, t1 = Date.now();
    line.setAttribute("points", series.map((p) => (((p.t - t0) / (t1 - t0)) * 600).toFixed(1) + "," + (190 - ((p.v - low) / spread) * 180).toFixed(1)).join(" "));
    document.getElementById("chart-range").textContent = "min " + low + " · max " + high + " · " + series.length + " readings";
    const last = series[series.length - 1];
    document.getElementById("latest-value").textContent = String(last.v);
    document.getElementById("latest-time").textContent = new Date(last.t).toLocaleTimeString([], { hour12: false });
  }
  function chartReading(id, reading) {
    if (!chart || device.dataset.device !== id) return;
    const value = reading.values[device.dataset.metric];
    if (value === undefined) return;
    series.push({ t: Date.parse(reading.time), v: value });
    series.sort((a, b) => a.t - b.t);
    drawChart();
  }
  async function loadHistory() {
    if (!chart) return;
    const start = new Date(Date.now() - 3600 * 1000).toISOString();
    let url = device.dataset.historyUrl + "?metric=" + encodeURIComponent(device.dataset.metric) + "&start=" + encodeURIComponent(start);
    const loaded = [];
    while (url) {
      const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (!response.ok) break;
      const page = await response.json();
      for (const p of page.points) loaded.push({ t: Date.parse(p.time), v: p.value });
      url = page.next;
    }
    series = loaded.concat(series).sort((a, b) => a.t - b.t);
    drawChart();
  }

  // --- the event stream ---------------------------------------------------------------------
  function heard() {
    lastHeard = Date.now();
    setState("live");
  }
  // The stream passes on only the devices this page shows (a tenant's event names up to
  // thousands); a page with no device rows gets alerts, health and counts.
  function eventsUrl() {
    const ids = device ? [device.dataset.device] : Array.from(document.querySelectorAll("#devices tr[data-device]"), (row) => row.dataset.device);
    return body.dataset.eventsUrl + "?devices=" + ids.join(",");
  }
  function connect() {
    const source = new EventSource(eventsUrl());
    source.addEventListener("ping", heard);
    source.onmessage = (message) => {
      heard();
      const event = JSON.parse(message.data);
      addCounts(event);
      if (event.devices) updateDevices(event.devices);
      if (event.presence) updatePresence(event.presence);
      if (event.health) updateHealth(event.health);
      if (event.alerts) updateAlerts(event.alerts);
    };
    source.onerror = () => {
      // EventSource reconnects by itself (the server sends `retry: 2000`); a closed one does not.
      setState("reconnecting");
      if (source.readyState === EventSource.CLOSED) setTimeout(connect, 2000);
    };
  }
  setInterval(() => {
    if (lastHeard && Date.now() - lastHeard > 3 * pingSeconds * 1000) setState("stale");
    showRates();
  }, 1000);
  document.querySelectorAll("svg.trend").forEach(drawTrend);
  loadHistory();
  if (body.dataset.eventsUrl) connect();
})();
