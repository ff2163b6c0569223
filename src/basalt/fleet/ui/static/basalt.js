// Basalt Fleet's own script: live regions fed by server-sent events, and a few keys.
//
// An element with data-live="URL" opens an EventSource on URL. A "swap" event carries
// HTML whose top-level elements replace the elements of the page with the same id
// (ticked boxes stay ticked); an "append" event carries elements with data-into="ID"
// that are added to that element (the last 1000 kept; it scrolls when it was at the end).
(function () {
  "use strict";
  const KEEP = 1000;
  const open = new Set();

  function parse(html) {
    const template = document.createElement("template");
    template.innerHTML = html;
    return Array.from(template.content.children);
  }

  function swap(html) {
    for (const fresh of parse(html)) {
      const old = fresh.id && document.getElementById(fresh.id);
      if (!old) continue;
      for (const box of old.querySelectorAll("input[type=checkbox]:checked")) {
        const twin = fresh.querySelector(
          `input[type=checkbox][name="${box.name}"][value="${CSS.escape(box.value)}"]`);
        if (twin) twin.checked = true;
      }
      old.replaceWith(fresh);
      if (window.htmx) window.htmx.process(fresh);
    }
  }

  function append(html) {
    for (const item of parse(html)) {
      const into = document.getElementById(item.dataset.into || "");
      if (!into) continue;
      const atEnd = into.scrollHeight - into.scrollTop - into.clientHeight < 40;
      into.appendChild(item);
      while (into.children.length > KEEP) into.firstElementChild.remove();
      if (atEnd) into.scrollTop = into.scrollHeight;
    }
  }

  function connect(node) {
    if (node._live) return;
    const source = new EventSource(node.dataset.live);
    node._live = source;
    open.add(node);
    const mark = (text, down) => {
      const state = node.querySelector(".live-state");
      if (state) { state.textContent = text; state.classList.toggle("down", down); }
    };
    source.addEventListener("swap", (e) => swap(e.data));
    source.addEventListener("append", (e) => append(e.data));
    source.addEventListener("open", () => mark("live", false));
    source.addEventListener("error", () => mark("reconnecting…", true));
  }

  function scan(root) {
    for (const node of root.querySelectorAll("[data-live]")) connect(node);
    for (const node of open) {
      if (!document.body.contains(node)) { node._live.close(); open.delete(node); }
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    scan(document);
    document.body.addEventListener("htmx:afterSettle", (e) => scan(e.target));
    // Refusals (4xx) are shown where the request said, like answers.
    if (window.htmx) {
      window.htmx.config.responseHandling = [
        { code: "204", swap: false },
        { code: "[23]..", swap: true },
        { code: "[4]..", swap: true, error: false },
        { code: "...", swap: false, error: true },
      ];
    }
  });
  window.addEventListener("pagehide", () => {
    for (const node of open) node._live.close();
  });

  // "/" goes to the search field; Escape leaves it.
  document.addEventListener("keydown", (e) => {
    const typing = /^(INPUT|TEXTAREA|SELECT)$/.test(document.activeElement.tagName);
    if (e.key === "/" && !typing) {
      const search = document.querySelector("[data-search]");
      if (search) { e.preventDefault(); search.focus(); search.select(); }
    } else if (e.key === "Escape" && typing) {
      document.activeElement.blur();
    }
  });

  // "Select all" boxes tick the boxes of their table.
  document.addEventListener("change", (e) => {
    const all = e.target.closest("[data-select-all]");
    if (!all) return;
    const table = all.closest("table");
    for (const box of table.querySelectorAll("tbody input[type=checkbox]")) box.checked = all.checked;
  });
})();
