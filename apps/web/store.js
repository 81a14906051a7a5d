// Conversations that survive a reload: kept in this browser's localStorage, never sent anywhere
// but in the chat requests themselves.
"use strict";

const Store = (() => {
  const KEY = "together.chats.v1";
  const MODEL_KEY = "together.model";
  const MAX_CHATS = 50;  // the oldest go first: localStorage holds a few MB per origin

  const newId = () => Date.now().toString(36) + Math.random().toString(36).slice(2, 8);

  function fresh() {
    return { id: newId(), title: "", messages: [], updated: Date.now() };
  }

  // {current, chats: [{id, title, messages: [{role, content, model?, note?}], updated}]}, newest first
  function load() {
    let data = null;
    try {
      data = JSON.parse(localStorage.getItem(KEY) || "null");
    } catch (_) { /* unreadable: start over */ }
    if (!data || !Array.isArray(data.chats)) data = { current: null, chats: [] };
    data.chats = data.chats.filter((c) => c && typeof c.id === "string" && Array.isArray(c.messages));
    if (!data.chats.some((c) => c.id === data.current)) {
      if (!data.chats.length) data.chats.push(fresh());
      data.current = data.chats[0].id;
    }
    return data;
  }

  function save(data) {
    const keep = data.chats.filter((c) => c.messages.length || c.id === data.current);
    keep.sort((a, b) => b.updated - a.updated);
    data.chats = keep.slice(0, MAX_CHATS);
    try {
      localStorage.setItem(KEY, JSON.stringify(data));
    } catch (_) {
      // full (or storage off): drop the oldest half and try once more; the page works without it
      data.chats = data.chats.slice(0, Math.max(1, data.chats.length >> 1));
      try { localStorage.setItem(KEY, JSON.stringify(data)); } catch (_) { /* not kept */ }
    }
  }

  function title(chat) {
    const first = chat.messages.find((m) => m.role === "user");
    const t = first ? first.content.replace(/\s+/g, " ").trim() : "";
    return t ? (t.length > 40 ? t.slice(0, 39) + "…" : t) : "New chat";
  }

  const model = () => { try { return localStorage.getItem(MODEL_KEY) || ""; } catch (_) { return ""; } };
  const setModel = (m) => { try { localStorage.setItem(MODEL_KEY, m); } catch (_) { /* not kept */ } };

  return { load, save, fresh, title, model, setModel };
})();
