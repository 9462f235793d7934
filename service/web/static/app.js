// Codeplan's page script: local times, copy buttons, confirmations, and the live meters.
(function () {
  "use strict";
  var lang = document.documentElement.lang || "en";

  function localise(root) {
    (root || document).querySelectorAll("time[datetime]").forEach(function (el) {
      var iso = el.getAttribute("datetime");
      if (!iso) return;
      var when = new Date(iso);
      if (isNaN(when)) return;
      var opts = el.dataset.format === "time"
        ? { hour: "2-digit", minute: "2-digit", second: "2-digit" }
        : { weekday: "short", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" };
      el.textContent = when.toLocaleString(lang, opts);
      el.title = when.toString();
    });
  }

  function copy(button) {
    var source = document.querySelector(button.dataset.copy);
    if (!source) return;
    var text = source.textContent;
    var done = function () {
      var label = button.textContent;
      button.textContent = button.dataset.copied || "Copied";
      setTimeout(function () { button.textContent = label; }, 1500);
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done, function () { select(source); });
    } else {
      select(source);
      try { document.execCommand("copy"); done(); } catch (e) { /* the text is selected: copy by hand */ }
    }
  }

  function select(node) {
    var range = document.createRange();
    range.selectNodeContents(node);
    var selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
  }

  document.addEventListener("click", function (event) {
    var button = event.target.closest("button[data-copy]");
    if (button) copy(button);
  });
  document.addEventListener("submit", function (event) {
    var message = event.target.dataset.confirm;
    if (message && !window.confirm(message)) event.preventDefault();
  });

  // ---- live meters: one WebSocket, pushed by the server when the ledger settles ----
  var section = document.querySelector("[data-live]");
  var format = new Intl.NumberFormat(lang);

  function show(usage) {
    usage.windows.forEach(function (w) {
      var card = section.querySelector('[data-window="' + w.kind + '"]');
      if (!card) return;
      var whole = Math.max(w.allowance, 1);
      var usedPct = Math.min(100, 100 * w.used / whole);
      var reservedPct = Math.min(100 - usedPct, 100 * w.reserved / whole);
      card.querySelector(".meter .used").style.width = usedPct + "%";
      card.querySelector(".meter .reserved").style.width = reservedPct + "%";
      var meter = card.querySelector(".meter");
      meter.setAttribute("aria-valuenow", String(w.used + w.reserved));
      meter.setAttribute("aria-valuemax", String(w.allowance));
      meter.setAttribute("aria-valuetext", (usedPct + reservedPct).toFixed(1) + "%");
      ["used", "reserved", "remaining", "allowance"].forEach(function (field) {
        card.querySelector('[data-field="' + field + '"]').textContent = format.format(w[field]);
      });
      var reset = card.querySelector('[data-field="resets_at"]');
      if (w.resets_at) { reset.setAttribute("datetime", w.resets_at); } else {
        reset.setAttribute("datetime", ""); reset.textContent = section.dataset.tOpens;
      }
    });
    var requests = document.querySelector('[data-field="today-requests"]');
    if (requests) requests.textContent = format.format(usage.today.requests);
    var tokens = document.querySelector('[data-field="today-tokens"]');
    if (tokens) tokens.textContent = format.format(usage.today.billed_tokens);
    section.querySelector('[data-field="at"]').setAttribute("datetime", usage.at);
    section.dataset.updates = String(Number(section.dataset.updates || 0) + 1);
    localise(section);
    refreshActivity();
  }

  // the chart and today's table follow a live update: one fetch at a time, the last one wins
  var activity = document.getElementById("activity");
  var fetching = false, again = false;
  function refreshActivity() {
    if (!activity) return;
    if (fetching) { again = true; return; }
    fetching = true;
    fetch(activity.dataset.src, { credentials: "same-origin", headers: { accept: "text/html" } })
      // a redirect means the session ended (the login page): keep what is shown
      .then(function (response) { return response.ok && !response.redirected ? response.text() : null; })
      .then(function (html) {
        if (html !== null) { activity.innerHTML = html; localise(activity); }
      })
      .catch(function () { /* the next update tries again */ })
      .then(function () {
        fetching = false;
        if (again) { again = false; refreshActivity(); }
      });
  }

  function status(text, live) {
    section.querySelector("[data-live-status]").textContent = text;
    section.classList.toggle("live", live);
  }

  function connect(delay) {
    var scheme = location.protocol === "https:" ? "wss://" : "ws://";
    var socket = new WebSocket(scheme + location.host + section.dataset.live);
    socket.onopen = function () { delay = 1000; status(section.dataset.tLive, true); };
    socket.onmessage = function (event) {
      var message = JSON.parse(event.data);
      if (message.type === "usage") show(message);
    };
    socket.onclose = function (event) {
      // closes that reconnecting will not mend: said, and no "Reconnecting…" left on screen
      if (event.code === 4401) { status(section.dataset.tSignedOut, false); return; }
      if (event.code === 4402) { status(section.dataset.tNoPlan, false); return; }
      if (event.code === 4403) { status(section.dataset.tStopped, false); return; }
      status(section.dataset.tReconnecting, false);
      setTimeout(function () { connect(Math.min(delay * 2, 30000)); }, delay);
    };
  }

  localise(document);
  if (section && "WebSocket" in window) connect(1000);
})();
