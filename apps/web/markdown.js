// Answers as Markdown: lists, tables, code blocks with a copy button. A model's text is untrusted:
// marked (vendor/) parses it with raw HTML turned into visible text, then DOMPurify (vendor/) removes
// whatever could still run or reach out (scripts, handlers, javascript: links, images, styles, ids).
"use strict";

const Markdown = (() => {
  const ESC = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  const escape = (s) => String(s).replace(/[&<>"']/g, (c) => ESC[c]);

  const md = new marked.Marked({
    gfm: true,
    breaks: false,
    renderer: {
      // raw HTML from the model is shown as the text it is, never parsed as markup
      html(token) { return escape(token.text); },
      // an image would be fetched from wherever the model points: show a link to it instead
      image(token) { return `<a href="${escape(token.href)}">${escape(token.text || token.href)}</a>`; },
    },
  });

  const PURIFY = {
    USE_PROFILES: { html: true },  // no SVG or MathML
    // ids and names could shadow the page's own elements (DOM clobbering); styles could cover it
    FORBID_TAGS: ["style", "img", "form", "button", "textarea", "select", "iframe", "object", "embed"],
    FORBID_ATTR: ["id", "name", "style", "srcset"],
  };
  // links open elsewhere and tell the target nothing about the page
  DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A" && node.hasAttribute("href")) {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer");
    }
  });

  // The sanitised HTML of a Markdown text.
  function toHtml(text) {
    return DOMPurify.sanitize(md.parse(String(text ?? "")), PURIFY);
  }

  async function copyText(text) {
    // the clipboard API exists only in secure contexts (https, localhost); a peer on the LAN is
    // plain http, where the old selection + execCommand path still works
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
      return;
    }
    const ta = document.createElement("textarea");
    ta.value = text;
    ta.setAttribute("readonly", "");
    ta.style.position = "fixed";
    ta.style.opacity = "0";
    document.body.append(ta);
    ta.select();
    try {
      if (!document.execCommand("copy")) throw new Error("copy refused");
    } finally {
      ta.remove();
    }
  }

  function addCopyButtons(root) {
    for (const pre of root.querySelectorAll("pre")) {
      const wrap = document.createElement("div");
      wrap.className = "code";
      const btn = document.createElement("button");
      btn.type = "button";
      btn.className = "copy";
      btn.textContent = "Copy";
      btn.title = "copy this code";
      btn.addEventListener("click", async () => {
        const code = pre.querySelector("code") || pre;
        try {
          await copyText(code.textContent);
          btn.textContent = "Copied";
          btn.dataset.copied = "true";
        } catch (_) {
          btn.textContent = "Copy failed";
        }
        setTimeout(() => { btn.textContent = "Copy"; }, 1500);
      });
      pre.replaceWith(wrap);
      wrap.append(btn, pre);
    }
  }

  // Puts the rendered text into an element; the Markdown source stays on it (dataset.text).
  function render(target, text) {
    target.innerHTML = toHtml(text);
    target.dataset.text = text;
    addCopyButtons(target);
  }

  // Re-renders a message while it streams in, at most every `ms` milliseconds (parsing the whole
  // text each time is cheap for a chat answer; doing it per token is not needed).
  function streamer(target, ms = 60) {
    let text = "", timer = null, last = 0;
    const flush = () => {
      timer = null;
      last = performance.now();
      render(target, text);
    };
    return {
      update(t) {
        text = t;
        if (timer !== null) return;
        const wait = last + ms - performance.now();
        if (wait <= 0) flush();
        else timer = setTimeout(flush, wait);
      },
      finish(t) {
        if (timer !== null) clearTimeout(timer);
        text = t;
        flush();
      },
    };
  }

  return { toHtml, render, streamer };
})();
