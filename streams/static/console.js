/* leakwatch operator console: list, detail and overview pages.
 * Plain JavaScript, no build step, no inline script (the CSP forbids it).
 * All text goes through textContent after safe(): a last-line mask of
 * personal-number-like digit runs (our own alert ids and pseudonyms kept).
 */
"use strict";

(function () {
  // ------------------------------------------------------------------ text
  var KEEP_OR_MASK = /(lw-[0-9a-f]{8}-[0-9a-f]{8}-[0-9a-f]{8}|lw-[0-9a-f]{24}|mn_[0-9a-f]{8}-[0-9a-f]{8}|mn_[0-9a-f]{20})|(\p{Nd}{4}[ \-\u3000\uff0d]?\p{Nd}{4}[ \-\u3000\uff0d]?\p{Nd}{4}\p{Nd}*)/gu;
  function safe(value) {
    if (value === null || value === undefined) return "";
    return String(value).replace(KEEP_OR_MASK, function (m, keep) { return keep || "［伏字］"; });
  }

  var I18N = {
    ja: {
      brand: "leakwatch 監視コンソール", nav_list: "アラート一覧", nav_overview: "概要", logout: "ログアウト",
      lang_toggle: "English", signed_in: "担当: ",
      live_open: "ライブ更新中", live_connecting: "接続中…", live_error: "再接続中…",
      f_severity: "重要度", f_rule: "ルール", f_department: "所属", f_state: "状態", f_since: "期間（開始）",
      f_until: "期間（終了）", f_search: "職員・アラートIDで検索", f_reset: "条件をクリア",
      all: "すべて", high_plus: "高以上", open_states: "未完了（クローズ以外）",
      c_severity: "重要度", c_rule: "ルール", c_user: "職員", c_department: "所属", c_terminal: "端末",
      c_first: "最初", c_last: "最後", c_count: "件数", c_state: "状態",
      empty: "条件に合うアラートはありません。", loading: "読み込み中…",
      status_fmt: "{total}件中 {shown}件を表示（新しい順）", status_catching: "（履歴を読み込み中）",
      sev_low: "低", sev_medium: "中", sev_high: "高", sev_critical: "重大",
      st_new: "新規", st_escalated: "上申済・未受領", st_acknowledged: "受領済", st_closed: "クローズ",
      res_false_positive: "誤検知", res_confirmed: "事案確定",
      tier_fmt: "（第{n}段階まで上申）",
      back: "← アラート一覧へ", notfound: "このアラートはまだ届いていないか、存在しません。",
      s_meaning: "このアラートの意味", viewpoint: "観点", s_fp: "誤検知になりやすい例", s_facts: "概要",
      s_timeline: "職員の最近の操作", s_evidence: "証跡（イベント）", s_trail: "対応履歴（メール・受領・上申・クローズ）",
      trail_empty: "まだ記録はありません。", s_ppc: "個人情報保護委員会への報告期限",
      ppc_note: "期限は設定値（速報: 速やかに＝概ね{a}～{b}日、確報: {c}日／不正目的のおそれ{d}日）から計算しています。",
      s_actions: "対応", a_comment: "コメント", a_ack: "受領を記録する", a_close: "クローズ", a_fp: "誤検知",
      a_confirmed: "漏えい等事案と確定", a_unauth: "不正の目的のおそれがある", a_close_comment: "理由・対応内容（必須）",
      a_close_btn: "クローズする", no_pii: "個人番号や住民の氏名は入力しないでください。",
      a_reopen: "再オープン", a_reopen_comment: "再オープンする理由（必須）", a_reopen_btn: "再オープンする",
      acked_by: "{by} さんが {at} に受領（{via}）", closed_by: "{by} さんが {at} にクローズ: {res}",
      reopened_by: "{by} さんが {at} に再オープン: {why}", reopen_done: "再オープンしました。",
      not_acked: "未受領です。受領を記録すると時間経過による上申が止まります。",
      ack_done: "受領を記録しました。", close_done: "クローズしました。", confirm_close: "この内容でクローズしますか？",
      e_ts: "日時", e_id: "イベントID", e_action: "操作", e_result: "結果", e_terminal: "端末", e_subject: "対象（仮名）",
      e_records: "件数", e_device: "媒体",
      t_when: "いつ", t_who: "誰が", t_what: "何を", t_how: "どのように",
      k_user: "職員", k_department: "所属", k_window: "検知期間", k_first: "最初のイベント", k_last: "最後のイベント",
      k_count: "件数", k_revision: "版", k_terminals: "端末", k_devices: "媒体", k_subjects: "参照された記録（仮名）",
      k_rule: "ルールID", k_reason: "理由", k_tags: "タグ",
      p_known: "事案確定（把握）", p_prompt: "速報（速やかに）", p_final: "確報", p_unauth: "不正目的のおそれ",
      p_left: "あと{n}日", p_within: "{n}日以内", p_over: "{n}日超過", p_today: "本日が期限", yes: "あり", no: "なし",
      tl_none: "操作の記録はありません。", tl_zoom: "証跡の時間帯（拡大）", tl_legend: "太枠の大きな点 = 証跡のイベント、白抜き = 失敗した操作。点にカーソルを合わせると詳細を表示します。",
      o_total: "期間中のアラート", o_by_severity: "日別アラート数（重要度別）", o_by_rule: "日別アラート数（ルール別）",
      o_top_users: "アラートの多い職員", o_top_depts: "アラートの多い所属", o_health: "パイプラインの状態",
      h_lag: "未処理メッセージ（コンシューマラグ）", h_dlq: "デッドレター（件/分）", h_events: "処理イベント（件/秒）",
      h_mail_failed: "メール送信失敗（累計）", h_mails_sent: "送信メール（累計）", h_unacked: "未受領の上申アラート",
      h_no_samples: "計測中…（数十秒後に表示されます）", no_department: "（所属なし）", days_fmt: "{from}〜{to}",
      via_link: "メール内の確認リンク", via_cli: "コマンド", via_console: "コンソール", via_smtp: "メール (SMTP)",
      err_generic: "エラーが発生しました。"
    },
    en: {
      brand: "leakwatch operator console", nav_list: "Alerts", nav_overview: "Overview", logout: "Sign out",
      lang_toggle: "日本語", signed_in: "Operator: ",
      live_open: "live", live_connecting: "connecting…", live_error: "reconnecting…",
      f_severity: "Severity", f_rule: "Rule", f_department: "Department", f_state: "State", f_since: "From",
      f_until: "To", f_search: "Search user or alert id", f_reset: "Clear filters",
      all: "All", high_plus: "High and above", open_states: "Open (not closed)",
      c_severity: "Severity", c_rule: "Rule", c_user: "User", c_department: "Department", c_terminal: "Terminal",
      c_first: "First", c_last: "Last", c_count: "Count", c_state: "State",
      empty: "No alerts match.", loading: "Loading…",
      status_fmt: "Showing {shown} of {total} (newest first)", status_catching: " (still reading history)",
      sev_low: "low", sev_medium: "medium", sev_high: "high", sev_critical: "critical",
      st_new: "new", st_escalated: "escalated, not acknowledged", st_acknowledged: "acknowledged", st_closed: "closed",
      res_false_positive: "false positive", res_confirmed: "confirmed incident",
      tier_fmt: " (escalated to tier {n})",
      back: "← Back to alerts", notfound: "This alert has not arrived yet, or does not exist.",
      s_meaning: "What this alert means", viewpoint: "Viewpoint", s_fp: "Common false positives", s_facts: "Facts",
      s_timeline: "The user's recent activity", s_evidence: "Evidence (events)", s_trail: "History (mail, acks, escalation, closure)",
      trail_empty: "Nothing recorded yet.", s_ppc: "Report deadlines (PPC)",
      ppc_note: "Computed from settings (preliminary: promptly, about {a}-{b} days; final: {c} days, {d} for unauthorised purpose).",
      s_actions: "Actions", a_comment: "Comment", a_ack: "Acknowledge", a_close: "Close", a_fp: "False positive",
      a_confirmed: "Confirmed incident", a_unauth: "May be for an unauthorised purpose", a_close_comment: "Reason / what was done (required)",
      a_close_btn: "Close alert", no_pii: "Never type a personal number or a resident's name.",
      a_reopen: "Reopen", a_reopen_comment: "Why reopen (required)", a_reopen_btn: "Reopen alert",
      acked_by: "Acknowledged by {by} at {at} ({via})", closed_by: "Closed by {by} at {at}: {res}",
      reopened_by: "Reopened by {by} at {at}: {why}", reopen_done: "Reopened.",
      not_acked: "Not acknowledged. Acknowledging stops the timed escalation.",
      ack_done: "Acknowledged.", close_done: "Closed.", confirm_close: "Close this alert?",
      e_ts: "Time", e_id: "Event id", e_action: "Action", e_result: "Result", e_terminal: "Terminal", e_subject: "Record (pseudonym)",
      e_records: "Records", e_device: "Device",
      t_when: "When", t_who: "Who", t_what: "What", t_how: "How",
      k_user: "User", k_department: "Department", k_window: "Window", k_first: "First event", k_last: "Last event",
      k_count: "Count", k_revision: "Revision", k_terminals: "Terminals", k_devices: "Devices", k_subjects: "Records (pseudonyms)",
      k_rule: "Rule id", k_reason: "Reason", k_tags: "Tags",
      p_known: "Confirmed (aware)", p_prompt: "Preliminary report (promptly)", p_final: "Final report", p_unauth: "Unauthorised purpose",
      p_left: "{n} days left", p_within: "within {n} days", p_over: "{n} days overdue", p_today: "due today", yes: "yes", no: "no",
      tl_none: "No activity recorded.", tl_zoom: "The evidence, enlarged", tl_legend: "Large outlined dots = evidence events, hollow = failed operations. Hover a dot for details.",
      o_total: "Alerts in range", o_by_severity: "Alerts per day by severity", o_by_rule: "Alerts per day by rule",
      o_top_users: "Users with most alerts", o_top_depts: "Departments with most alerts", o_health: "Pipeline health",
      h_lag: "Consumer lag (messages)", h_dlq: "Dead letters per minute", h_events: "Events per second",
      h_mail_failed: "Mail failures (total)", h_mails_sent: "Mails sent (total)", h_unacked: "Escalated, unacknowledged",
      h_no_samples: "Sampling… (charts appear after a few intervals)", no_department: "(no department)", days_fmt: "{from} – {to}",
      via_link: "ack link in the mail", via_cli: "command line", via_console: "console", via_smtp: "mail (SMTP)",
      err_generic: "Something went wrong."
    }
  };
  var lang = (function () {
    try { return localStorage.getItem("lw-lang") === "en" ? "en" : "ja"; } catch (e) { return "ja"; }
  })();
  function T(key, vars) {
    var s = (I18N[lang] && I18N[lang][key]) || I18N.ja[key] || key;
    if (vars) Object.keys(vars).forEach(function (k) { s = s.split("{" + k + "}").join(vars[k]); });
    return s;
  }

  // ------------------------------------------------------------------ DOM helpers
  function $(sel) { return document.querySelector(sel); }
  function h(tag, attrs) {
    var el = document.createElement(tag);
    setAttrs(el, attrs);
    for (var i = 2; i < arguments.length; i++) append(el, arguments[i]);
    return el;
  }
  var SVGNS = "http://www.w3.org/2000/svg";
  function s(tag, attrs) {
    var el = document.createElementNS(SVGNS, tag);
    setAttrs(el, attrs);
    for (var i = 2; i < arguments.length; i++) append(el, arguments[i]);
    return el;
  }
  function setAttrs(el, attrs) {
    if (!attrs) return;
    Object.keys(attrs).forEach(function (k) {
      var v = attrs[k];
      if (v === null || v === undefined || v === false) return;
      if (k === "text") el.textContent = safe(v);
      else if (k === "class") el.setAttribute("class", v);
      else el.setAttribute(k, String(v));
    });
  }
  function append(el, child) {
    if (child === null || child === undefined || child === false) return;
    if (Array.isArray(child)) { child.forEach(function (c) { append(el, c); }); return; }
    if (typeof child === "string" || typeof child === "number") el.appendChild(document.createTextNode(safe(child)));
    else el.appendChild(child);
  }
  function clear(el) { while (el.firstChild) el.removeChild(el.firstChild); return el; }
  function setText(el, v) { if (el) el.textContent = safe(v); }

  // ------------------------------------------------------------------ time
  var TZ = "Asia/Tokyo";
  function fmt(iso, withSeconds) {
    if (!iso) return "";
    var d = new Date(iso);
    if (isNaN(d.getTime())) return String(iso);
    var opts = { timeZone: TZ, year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit", hour12: false };
    if (withSeconds) opts.second = "2-digit";
    return new Intl.DateTimeFormat(lang === "ja" ? "ja-JP" : "en-CA", opts).format(d);
  }
  function fmtShort(iso, withSeconds) {
    var d = new Date(iso);
    if (isNaN(d.getTime())) return "";
    var opts = { timeZone: TZ, month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit", hour12: false };
    if (withSeconds) { delete opts.month; delete opts.day; opts.second = "2-digit"; }
    return new Intl.DateTimeFormat(lang === "ja" ? "ja-JP" : "en-CA", opts).format(d);
  }
  function fmtDay(isoDay) { return lang === "ja" ? String(isoDay).split("-").join("/") : String(isoDay); }
  function dayLabel(isoDay) { return isoDay.slice(5).replace("-", "/"); }

  // ------------------------------------------------------------------ API
  var ME = null;
  function api(path, opts) {
    opts = opts || {};
    var init = { credentials: "same-origin", headers: { "Accept": "application/json" } };
    if (opts.body !== undefined) {
      init.method = "POST";
      init.headers["Content-Type"] = "application/json";
      init.headers["X-CSRF-Token"] = ME ? ME.csrf : "";
      init.body = JSON.stringify(opts.body);
    }
    return fetch(path, init).then(function (r) {
      if (r.status === 401) { location.href = "/console/login?next=" + encodeURIComponent(location.pathname + location.search); throw new Error("signed out"); }
      return r.json().then(function (doc) { return { status: r.status, ok: r.ok, doc: doc }; });
    });
  }

  function applyStaticText() {
    document.documentElement.lang = lang;
    document.querySelectorAll("[data-i18n]").forEach(function (el) { el.textContent = T(el.getAttribute("data-i18n")); });
    setText($("#lang"), T("lang_toggle"));
    if (ME) setText($("#operator"), T("signed_in") + ME.user);
    var live = $("#live");
    if (live) setText(live, T("live_" + live.getAttribute("data-state")));
  }

  function sevBadge(sev) { return h("span", { "class": "sev " + sev, text: T("sev_" + sev) }); }
  function stateBadge(state, resolution) {
    var label = T("st_" + state) + (state === "closed" && resolution ? (lang === "ja" ? "・" : ": ") + T("res_" + resolution) : "");
    return h("span", { "class": "state " + state, text: label });
  }
  function viaWord(via) { return I18N[lang]["via_" + via] ? T("via_" + via) : via; }

  // ------------------------------------------------------------------ live updates
  var onUpdate = function () {};
  function connectStream() {
    var live = $("#live");
    var es = new EventSource("/console/api/stream");
    function state(v) { if (live) { live.setAttribute("data-state", v); setText(live, T("live_" + v)); } }
    es.addEventListener("open", function () { state("open"); });
    es.addEventListener("hello", function () { state("open"); });
    es.addEventListener("alerts", function (ev) {
      var data = {};
      try { data = JSON.parse(ev.data); } catch (e) { /* ignore */ }
      onUpdate(data.ids || []);
    });
    es.addEventListener("error", function () { state("error"); });
  }
  function debounce(fn, ms) {
    var t = null;
    return function () { var args = arguments; clearTimeout(t); t = setTimeout(function () { fn.apply(null, args); }, ms); };
  }

  // ------------------------------------------------------------------ list page
  function listPage() {
    var form = $("#filters");
    var tbody = $("#alerts tbody");
    var known = {};
    var firstLoad = true;
    var lastDoc = null;
    var pendingIds = {};

    function params() {
      var p = new URLSearchParams();
      ["severity", "rule", "department", "state", "since", "until", "q"].forEach(function (name) {
        // A filter from the URL waits in data-want until the menus have their options (first load).
        var el = form.elements[name];
        var v = el.getAttribute("data-want") || el.value;
        if (v) p.set(name, v);
      });
      return p;
    }
    function fromUrl() {
      var p = new URLSearchParams(location.search);
      ["severity", "rule", "department", "state", "since", "until", "q"].forEach(function (name) {
        if (p.get(name)) form.elements[name].setAttribute("data-want", p.get(name));
      });
      ["since", "until", "q"].forEach(function (name) { if (p.get(name)) form.elements[name].value = p.get(name); });
    }
    function fillSelect(sel, options) {
      var want = sel.getAttribute("data-want");
      var current = want !== null ? want : sel.value;
      sel.removeAttribute("data-want");
      clear(sel);
      options.forEach(function (o) { sel.appendChild(h("option", { value: o[0], text: o[1] })); });
      var values = options.map(function (o) { return o[0]; });
      if (current && values.indexOf(current) < 0) sel.appendChild(h("option", { value: current, text: current }));
      sel.value = current || "";
    }
    function fillFacets(f) {
      fillSelect(form.elements.severity, [["", T("all")], ["high,critical", T("high_plus")]].concat(
        f.severities.slice().reverse().map(function (v) { return [v, T("sev_" + v)]; })));
      fillSelect(form.elements.rule, [["", T("all")]].concat(f.rules.map(function (r) { return [r.id, lang === "ja" ? r.title : r.title_en]; })));
      fillSelect(form.elements.department, [["", T("all")]].concat(f.departments.map(function (d) { return [d, d]; })));
      fillSelect(form.elements.state, [["", T("all")], ["new,escalated,acknowledged", T("open_states")]].concat(
        f.states.map(function (v) { return [v, T("st_" + v)]; })));
    }
    function render(doc) {
      lastDoc = doc;
      fillFacets(doc.facets);
      clear(tbody);
      doc.alerts.forEach(function (a) {
        var fresh = !firstLoad && (!known[a.alert_id] || known[a.alert_id] !== a.revision + a.state || pendingIds[a.alert_id]);
        known[a.alert_id] = a.revision + a.state;
        var link = h("a", { href: "/alerts/" + encodeURIComponent(a.alert_id), text: lang === "ja" ? a.title : a.title_en });
        var tr = h("tr", { "data-id": a.alert_id, "class": (fresh ? "fresh " : "") + (a.state === "closed" ? "closed" : "") },
          h("td", null, sevBadge(a.severity)),
          h("td", null, link),
          h("td", { "class": "mono", text: a.user }),
          h("td", { text: a.department }),
          h("td", { "class": "mono", text: (a.terminals || []).join(", ") }),
          h("td", { "class": "when", text: fmt(a.first_ts) }),
          h("td", { "class": "when", text: fmt(a.last_ts) }),
          h("td", { "class": "num", text: a.count }),
          h("td", null, stateBadge(a.state, a.resolution)));
        tbody.appendChild(tr);
      });
      pendingIds = {};
      firstLoad = false;
      $("#empty").hidden = doc.alerts.length > 0;
      setText($("#status"), T("status_fmt", { total: doc.total, shown: doc.alerts.length }) + (doc.caught_up ? "" : T("status_catching")));
    }
    function load() {
      var p = params();
      var qs = p.toString();
      history.replaceState(null, "", "/console" + (qs ? "?" + qs : ""));
      return api("/console/api/alerts?" + qs).then(function (r) { if (r.ok) render(r.doc); });
    }
    var reload = debounce(load, 250);
    tbody.addEventListener("click", function (ev) {
      if (ev.target.closest("a")) return;
      var tr = ev.target.closest("tr[data-id]");
      if (tr) location.href = "/alerts/" + encodeURIComponent(tr.getAttribute("data-id"));
    });
    form.addEventListener("change", reload);
    form.addEventListener("input", function (ev) { if (ev.target.name === "q") reload(); });
    form.addEventListener("submit", function (ev) { ev.preventDefault(); load(); });
    form.addEventListener("reset", function () {
      setTimeout(function () {
        ["severity", "rule", "department", "state"].forEach(function (n) { form.elements[n].value = ""; });
        load();
      }, 0);
    });
    onUpdate = function (ids) { ids.forEach(function (id) { pendingIds[id] = true; }); reload(); };
    relabel = function () { if (lastDoc) { firstLoad = true; render(lastDoc); } };
    fromUrl();
    setText($("#status"), T("loading"));
    load();
  }

  // ------------------------------------------------------------------ detail page
  var ACTION_COLORS = { login: "#7d8796", logout: "#7d8796", search: "#1f5fa8", view: "#1f5fa8", update: "#3d8b6e",
    export: "#d0531b", print: "#c08a00", print_screen: "#c08a00", usb_write: "#b0122b", media_write: "#b0122b" };
  function actionColor(a) { return ACTION_COLORS[a] || "#6b4fa0"; }

  function timelineChart(rows, evidenceIds, t0, t1, label) {
    var actions = [];
    rows.forEach(function (r) { if (actions.indexOf(r.action) < 0) actions.push(r.action); });
    var longest = Math.max.apply(null, actions.map(function (a) { return String(a).length; }));
    var W = 760, left = Math.min(220, 24 + longest * 8), right = 14, top = 8, lane = 22, H = top + actions.length * lane + 30;
    var short = (t1 - t0) < 2 * 3600000;
    var x = function (t) { return left + (t - t0) / (t1 - t0) * (W - left - right); };
    var svg = s("svg", { viewBox: "0 0 " + W + " " + H, role: "img", "aria-label": label });
    actions.forEach(function (a, i) {
      var y = top + i * lane + lane / 2;
      svg.appendChild(s("line", { "class": "grid", x1: left, x2: W - right, y1: y, y2: y }));
      svg.appendChild(s("text", { x: left - 6, y: y + 4, "text-anchor": "end", text: a }));
    });
    var axisY = top + actions.length * lane + 4;
    svg.appendChild(s("line", { "class": "axis", x1: left, x2: W - right, y1: axisY, y2: axisY }));
    for (var k = 0; k <= 4; k++) {
      var tt = t0 + (t1 - t0) * k / 4;
      var xx = x(tt);
      svg.appendChild(s("line", { "class": "axis", x1: xx, x2: xx, y1: axisY, y2: axisY + 4 }));
      svg.appendChild(s("text", { x: xx, y: axisY + 16, "text-anchor": k === 0 ? "start" : (k === 4 ? "end" : "middle"), text: fmtShort(new Date(tt).toISOString(), short && k > 0) }));
    }
    rows.forEach(function (r) {
      var t = new Date(r.ts).getTime();
      if (isNaN(t) || t < t0 || t > t1) return;
      var hit = evidenceIds[r.event_id];
      var y = top + actions.indexOf(r.action) * lane + lane / 2;
      var failed = r.result && r.result !== "success";
      svg.appendChild(s("circle", { cx: x(t).toFixed(1), cy: y, r: hit ? 6 : 4, fill: failed ? "#fff" : actionColor(r.action),
        stroke: hit ? "#17202c" : actionColor(r.action), "stroke-width": hit ? 2.5 : 1.5, "class": hit ? "hit" : "other", "data-event": r.event_id },
        s("title", { text: fmt(r.ts, true) + " " + r.action + " " + (r.result || "") + " " + (r.terminal || "") + (r.subject ? " " + r.subject : "") + (hit ? " ★" : "") })));
    });
    return svg;
  }

  function timelineSvg(rows, evidenceIds) {
    if (!rows.length) return h("p", { "class": "muted", text: T("tl_none") });
    var times = rows.map(function (r) { return new Date(r.ts).getTime(); }).filter(function (t) { return !isNaN(t); });
    var t0 = Math.min.apply(null, times), t1 = Math.max.apply(null, times);
    if (t1 === t0) { t0 -= 30 * 60000; t1 += 30 * 60000; }
    var wrap = h("div", { "class": "timeline-wrap" }, timelineChart(rows, evidenceIds, t0, t1, T("s_timeline")));
    // The evidence often sits in a few minutes of a long history: show that stretch enlarged too.
    var hitTimes = rows.filter(function (r) { return evidenceIds[r.event_id]; }).map(function (r) { return new Date(r.ts).getTime(); });
    if (hitTimes.length > 1) {
      var e0 = Math.min.apply(null, hitTimes), e1 = Math.max.apply(null, hitTimes);
      if (e1 > e0 && (e1 - e0) < 0.2 * (t1 - t0)) {
        var pad = Math.max((e1 - e0) * 0.1, 60000);
        wrap.appendChild(h("h3", { "class": "zoom-title", text: T("tl_zoom") }));
        wrap.appendChild(timelineChart(rows, evidenceIds, e0 - pad, e1 + pad, T("tl_zoom")));
      }
    }
    wrap.appendChild(h("div", { "class": "legend" }, h("span", { text: T("tl_legend") })));
    return wrap;
  }

  function detailPage() {
    var id = decodeURIComponent(location.pathname.split("/").pop() || "");
    var doc = null;
    var back = $("#back");
    if (document.referrer === "" && back) back.href = "/console";

    function fact(dl, key, value, cls) {
      if (value === null || value === undefined || value === "" || (Array.isArray(value) && !value.length)) return;
      dl.appendChild(h("dt", { text: T(key) }));
      dl.appendChild(h("dd", { "class": cls || null, text: Array.isArray(value) ? value.join(", ") : value }));
    }
    function render(d) {
      doc = d;
      var a = d.alert, sm = d.summary, ev = a.evidence || {};
      $("#notfound").hidden = true;
      $("#detail").hidden = false;
      var title = lang === "ja" ? a.title : (a.title_en || a.title);
      document.title = safe(title) + " - leakwatch";
      clear($("#d-sev")).appendChild(sevBadge(a.severity));
      setText($("#d-title"), title);
      setText($("#d-id"), a.alert_id);
      var st = clear($("#d-state"));
      st.className = "";
      st.appendChild(stateBadge(sm.state, sm.resolution));
      setText($("#d-tier"), sm.tier ? T("tier_fmt", { n: sm.tier }) : "");
      // meaning
      setText($("#d-viewpoint"), lang === "ja" ? d.rule.viewpoint_ja : d.rule.viewpoint_en);
      setText($("#d-description"), (lang === "ja" && d.rule.description_ja) || d.rule.description);
      var fp = clear($("#d-fp"));
      (d.rule.falsepositives || []).forEach(function (x) { fp.appendChild(h("li", { text: x })); });
      $("#d-fp-wrap").hidden = !(d.rule.falsepositives || []).length;
      // facts
      var dl = clear($("#d-facts"));
      fact(dl, "k_user", a.user, "mono");
      fact(dl, "k_department", a.department);
      fact(dl, "k_window", fmt(a.window.start) + " – " + fmt(a.window.end));
      fact(dl, "k_first", fmt(a.first_ts, true));
      fact(dl, "k_last", fmt(a.last_ts, true));
      fact(dl, "k_count", a.count);
      fact(dl, "k_terminals", ev.terminals, "mono");
      fact(dl, "k_devices", ev.devices, "mono");
      fact(dl, "k_subjects", (ev.subjects || []).length ? (ev.subjects.length + (lang === "ja" ? "件: " : ": ") + ev.subjects.slice(0, 6).join(", ") + (ev.subjects.length > 6 ? " …" : "")) : "", "mono");
      fact(dl, "k_rule", a.rule_id + (a.reason ? " / " + a.reason : ""), "mono");
      fact(dl, "k_revision", a.revision);
      fact(dl, "k_tags", a.tags);
      // timeline
      var hits = {};
      (ev.event_ids || []).forEach(function (x) { hits[x] = true; });
      var rows = (ev.timeline && ev.timeline.length ? ev.timeline : (ev.events || []));
      clear($("#d-timeline")).appendChild(timelineSvg(rows, hits));
      // evidence
      var tb = clear($("#d-evidence tbody"));
      var events = ev.events || [];
      setText($("#d-evcount"), "(" + events.length + ")");
      events.forEach(function (r) {
        tb.appendChild(h("tr", { "class": "hit" },
          h("td", { "class": "when", text: fmt(r.ts, true) }), h("td", { "class": "mono", text: r.event_id }),
          h("td", { text: r.action }), h("td", { text: r.result }), h("td", { "class": "mono", text: r.terminal }),
          h("td", { "class": "mono", text: r.subject || "" }), h("td", { "class": "num", text: r.records === undefined ? "" : r.records }),
          h("td", { "class": "mono", text: r.device || "" })));
      });
      // trail
      var tt = clear($("#d-trail tbody"));
      (d.trail || []).forEach(function (r) {
        tt.appendChild(h("tr", { "data-action": r.action },
          h("td", { "class": "when", text: fmt(r.at, true) }), h("td", { text: r.actor }),
          h("td", { text: lang === "ja" ? r.what : r.what_en }), h("td", { text: viaWord(r.via) })));
      });
      $("#d-trail-empty").hidden = (d.trail || []).length > 0;
      // PPC
      var ppc = $("#ppc");
      ppc.hidden = !d.ppc;
      if (d.ppc) {
        var pd = clear($("#ppc-facts"));
        var left = function (n) { return n > 0 ? T("p_left", { n: n }) : (n === 0 ? T("p_today") : T("p_over", { n: -n })); };
        var paren = function (x) { return lang === "ja" ? "（" + x + "）" : " (" + x + ")"; };
        fact(pd, "p_known", fmt(d.ppc.known_at));
        fact(pd, "p_prompt", fmtDay(d.ppc.prompt_from) + " 〜 " + fmtDay(d.ppc.prompt_due) + paren(left(d.ppc.prompt_days_left)), d.ppc.prompt_days_left < 0 ? "overdue" : "due");
        fact(pd, "p_final", fmtDay(d.ppc.final_due) + paren(T("p_within", { n: d.ppc.final_days }) + (lang === "ja" ? "、" : ", ") + left(d.ppc.final_days_left)), d.ppc.final_days_left < 0 ? "overdue" : "due");
        fact(pd, "p_unauth", T(d.ppc.unauthorised_purpose === "yes" ? "yes" : "no"));
        if (ME && ME.ppc) {
          setText($("#ppc-note"), T("ppc_note", { a: ME.ppc.prompt_days_min, b: ME.ppc.prompt_days,
            c: ME.ppc.final_days, d: ME.ppc.final_days_unauthorised }));
        }
      }
      // actions
      var status = [];
      if (d.ack) status.push(T("acked_by", { by: d.ack.by, at: fmt(d.ack.at), via: viaWord(d.ack.via) }));
      if (d.closure) status.push(T("closed_by", { by: d.closure.by, at: fmt(d.closure.at), res: T("res_" + d.closure.resolution) }));
      if (d.reopened) status.push(T("reopened_by", { by: d.reopened.by, at: fmt(d.reopened.at), why: d.reopened.comment }));
      if (!d.ack && !d.closure) status.push(T("not_acked"));
      setText($("#a-status"), status.join(" / "));
      $("#ack-form").hidden = !!(d.ack || d.closure);
      $("#close-form").hidden = !!d.closure;
      $("#reopen-form").hidden = !d.closure;
    }
    function load() {
      return api("/console/api/alerts/" + encodeURIComponent(id)).then(function (r) {
        if (r.status === 404) { $("#notfound").hidden = false; $("#detail").hidden = true; return; }
        if (r.ok) render(r.doc);
      });
    }
    function message(text, ok) {
      var m = $("#a-msg");
      m.className = "msg " + (ok ? "ok" : "err");
      setText(m, text);
    }
    function post(path, body, okText, btn, form) {
      btn.disabled = true;
      return api(path, { body: body }).then(function (r) {
        btn.disabled = false;
        if (r.ok) { message(T(okText), true); if (form) form.reset(); return load(); }
        message((lang === "ja" ? r.doc.error_ja : r.doc.error) || T("err_generic"), false);
      }).catch(function () { btn.disabled = false; message(T("err_generic"), false); });
    }
    $("#ack-form").addEventListener("submit", function (ev) {
      ev.preventDefault();
      post("/console/api/alerts/" + encodeURIComponent(id) + "/ack", { comment: ev.target.elements.comment.value }, "ack_done", $("#ack-btn"));
    });
    var closeForm = $("#close-form");
    closeForm.addEventListener("change", function () {
      $("#unauth-wrap").hidden = closeForm.elements.resolution.value !== "confirmed";
    });
    closeForm.addEventListener("reset", function () { $("#unauth-wrap").hidden = true; });
    closeForm.addEventListener("submit", function (ev) {
      ev.preventDefault();
      var f = ev.target.elements;
      post("/console/api/alerts/" + encodeURIComponent(id) + "/close", {
        resolution: f.resolution.value, comment: f.comment.value,
        unauthorised_purpose: f.resolution.value === "confirmed" && f.unauthorised_purpose.checked
      }, "close_done", $("#close-btn"), closeForm);
    });
    var reopenForm = $("#reopen-form");
    reopenForm.addEventListener("submit", function (ev) {
      ev.preventDefault();
      post("/console/api/alerts/" + encodeURIComponent(id) + "/reopen", { comment: ev.target.elements.comment.value },
        "reopen_done", $("#reopen-btn"), reopenForm);
    });
    var reload = debounce(load, 200);
    onUpdate = function (ids) { if (!ids.length || ids.indexOf(id) >= 0 || !doc) reload(); };
    relabel = function () { if (doc) render(doc); };
    load();
  }

  // ------------------------------------------------------------------ overview page
  var SEV_COLORS = { low: "#5b8f3a", medium: "#c08a00", high: "#d0531b", critical: "#b0122b" };
  var PALETTE = ["#1f5fa8", "#d0531b", "#3d8b6e", "#6b4fa0", "#c08a00", "#b0122b", "#2a9bb5", "#7d8796"];

  function stackedBars(days, series) {
    // series: [{label, color, counts}]
    var W = 640, H = 220, left = 34, right = 8, top = 10, bottom = 34;
    var totals = days.map(function (_, i) { return series.reduce(function (acc, se) { return acc + se.counts[i]; }, 0); });
    var max = Math.max(1, Math.max.apply(null, totals));
    var step = niceStep(max);
    max = Math.ceil(max / step) * step;
    var svg = s("svg", { viewBox: "0 0 " + W + " " + H, role: "img" });
    var bw = (W - left - right) / days.length;
    var y = function (v) { return top + (H - top - bottom) * (1 - v / max); };
    for (var g = 0; g <= max; g += step) {
      svg.appendChild(s("line", { "class": "grid", x1: left, x2: W - right, y1: y(g), y2: y(g) }));
      svg.appendChild(s("text", { x: left - 4, y: y(g) + 4, "text-anchor": "end", text: g }));
    }
    days.forEach(function (day, i) {
      var acc = 0;
      series.forEach(function (se) {
        var v = se.counts[i];
        if (!v) return;
        svg.appendChild(s("rect", { x: (left + i * bw + bw * 0.15).toFixed(1), y: y(acc + v).toFixed(1), width: (bw * 0.7).toFixed(1),
          height: (y(acc) - y(acc + v)).toFixed(1), fill: se.color }, s("title", { text: day + " " + se.label + ": " + v })));
        acc += v;
      });
      if (days.length <= 16 || i % 2 === 0) {
        svg.appendChild(s("text", { x: left + i * bw + bw / 2, y: H - bottom + 14, "text-anchor": "middle", text: dayLabel(day) }));
      }
    });
    svg.appendChild(s("line", { "class": "axis", x1: left, x2: W - right, y1: y(0), y2: y(0) }));
    var legend = h("div", { "class": "legend" });
    series.forEach(function (se) {
      var i = h("i");
      i.style.background = se.color;
      legend.appendChild(h("span", null, i, se.label + " (" + se.counts.reduce(function (a, b) { return a + b; }, 0) + ")"));
    });
    return h("div", null, svg, legend);
  }
  function niceStep(max) {
    var raw = max / 4, p = Math.pow(10, Math.floor(Math.log10(raw || 1))), n = raw / p;
    return Math.max(1, (n <= 1 ? 1 : n <= 2 ? 2 : n <= 5 ? 5 : 10) * p);
  }
  function hbars(items, color) {
    if (!items.length) return h("p", { "class": "muted", text: T("empty") });
    var W = 640, row = 22, left = 210, right = 40, H = items.length * row + 6;
    var max = Math.max.apply(null, items.map(function (it) { return it.value; }).concat([1]));
    var svg = s("svg", { viewBox: "0 0 " + W + " " + H, role: "img" });
    items.forEach(function (it, i) {
      var y = 3 + i * row;
      var w = (W - left - right) * it.value / max;
      svg.appendChild(s("text", { x: left - 6, y: y + 14, "text-anchor": "end", text: it.label }));
      svg.appendChild(s("rect", { x: left, y: y + 3, width: Math.max(1, w).toFixed(1), height: row - 8, fill: it.color || color },
        s("title", { text: it.label + ": " + it.value })));
      svg.appendChild(s("text", { x: left + w + 4, y: y + 14, text: it.value }));
    });
    return svg;
  }
  function sparkline(points, color) {
    var W = 300, H = 60, pad = 4;
    var svg = s("svg", { viewBox: "0 0 " + W + " " + H, role: "img" });
    if (points.length < 2) {
      svg.appendChild(s("text", { x: 4, y: 34, text: T("h_no_samples") }));
      return svg;
    }
    var max = Math.max.apply(null, points.concat([1e-9]));
    var d = points.map(function (v, i) {
      var x = pad + (W - 2 * pad) * i / (points.length - 1);
      var y = H - pad - (H - 2 * pad) * (v / max);
      return (i ? "L" : "M") + x.toFixed(1) + " " + y.toFixed(1);
    }).join(" ");
    svg.appendChild(s("line", { "class": "grid", x1: pad, x2: W - pad, y1: H - pad, y2: H - pad }));
    svg.appendChild(s("path", { d: d, fill: "none", stroke: color, "stroke-width": 2 }));
    svg.appendChild(s("text", { x: W - pad, y: 12, "text-anchor": "end", text: "max " + fmtNum(max) }));
    return svg;
  }
  function fmtNum(v) {
    if (Math.abs(v) < 0.005) return "0";
    return Math.abs(v) >= 100 || v === Math.round(v) ? String(Math.round(v)) : v.toFixed(2);
  }

  function overviewPage() {
    var last = null;
    function render(d) {
      last = d;
      var cards = clear($("#o-cards"));
      var card = function (label, value, cls) { cards.appendChild(h("div", { "class": "card " + (cls || "") }, h("div", { "class": "muted", text: label }), h("div", { "class": "big", text: value }))); };
      card(T("o_total") + " " + T("days_fmt", { from: d.days[0], to: d.days[d.days.length - 1] }), d.total);
      ["new", "escalated", "acknowledged", "closed"].forEach(function (st) { card(T("st_" + st), d.states[st] || 0); });
      clear($("#o-sev")).appendChild(stackedBars(d.days, ["low", "medium", "high", "critical"].map(function (sv) {
        return { label: T("sev_" + sv), color: SEV_COLORS[sv], counts: d.by_severity[sv] };
      })));
      clear($("#o-rule")).appendChild(stackedBars(d.days, d.by_rule.map(function (r, i) {
        return { label: lang === "ja" ? r.title : r.title_en, color: PALETTE[i % PALETTE.length], counts: r.counts };
      })));
      clear($("#o-users")).appendChild(hbars(d.top_users.map(function (u) {
        return { label: u.user + (u.department ? "（" + u.department + "）" : ""), value: u.count, color: SEV_COLORS[u.max_severity] };
      }), "#1f5fa8"));
      clear($("#o-depts")).appendChild(hbars(d.top_departments.map(function (x) {
        return { label: x.department || T("no_department"), value: x.count };
      }), "#3d8b6e"));
      var hl = clear($("#o-health"));
      var series = d.health.series || [];
      var now = d.health.now || {};
      var metric = function (label, value, points, color, bad) {
        hl.appendChild(h("div", { "class": "metric" + (bad ? " bad" : "") }, h("h3", { text: label }), h("div", { "class": "big", text: fmtNum(value) }), sparkline(points, color)));
      };
      var lastOf = function (key) { return series.length ? series[series.length - 1][key] : 0; };
      metric(T("h_lag"), now.lag || 0, series.map(function (p) { return p.lag; }), "#1f5fa8", (now.lag || 0) > 10000);
      metric(T("h_dlq"), lastOf("dlq_per_min"), series.map(function (p) { return p.dlq_per_min; }), "#d0531b", lastOf("dlq_per_min") > 0);
      metric(T("h_events"), lastOf("events_per_s"), series.map(function (p) { return p.events_per_s; }), "#3d8b6e", false);
      metric(T("h_mail_failed"), now.mails_failed || 0, series.map(function (p) { return p.mails_failed; }), "#b0122b", (now.mails_failed || 0) > 0);
    }
    function load() { return api("/console/api/overview").then(function (r) { if (r.ok) render(r.doc); }); }
    var reload = debounce(load, 2000);
    onUpdate = function () { reload(); };
    relabel = function () { if (last) render(last); };
    load();
    setInterval(load, 30000);
  }

  // ------------------------------------------------------------------ start
  var relabel = function () {};
  function start() {
    var page = document.body.getAttribute("data-page");
    $("#lang").addEventListener("click", function () {
      lang = lang === "ja" ? "en" : "ja";
      try { localStorage.setItem("lw-lang", lang); } catch (e) { /* private mode */ }
      applyStaticText();
      relabel();
    });
    applyStaticText();
    api("/console/api/me").then(function (r) {
      if (!r.ok) return;
      ME = r.doc;
      TZ = ME.tz || TZ;
      var csrf = document.querySelector("#logout input[name=csrf]");
      if (csrf) csrf.value = ME.csrf;
      applyStaticText();
      if (page === "list") listPage();
      else if (page === "alert") detailPage();
      else if (page === "overview") overviewPage();
      connectStream();
    });
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
