-- examples/pay/live.lua: an order's state, live.
--
--   GET /orders/:out_trade_no/live   a page that shows the order's state and
--                                    history, updated over the WebSocket
--   GET /ws/orders/:out_trade_no     WebSocket: first the order as it is
--                                    ({"snapshot": true, "state", "history"}),
--                                    then one JSON text per transition, as
--                                    wxd.order publishes it (docs/order.md)
--
-- `require("live").mount(app)` adds both routes to an app; examples/pay's
-- app.lua does, and so does the browser spec's fixture.
local json = require "wxd.json"
local order = require "wxd.order"

local _M = {}

local function snapshot(o)
  local history = {}
  for i, h in ipairs(o.history or {}) do
    history[i] = { from = h.from or json.null, to = h.to, event = h.event or json.null, at = h.at }
  end
  return json.encode({
    snapshot = true, out_trade_no = o.out_trade_no, state = o.state, version = o.version, history = history,
  })
end

-- The page: plain DOM, no framework. Text only goes in through textContent.
local PAGE = [[<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Order</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
  body { font: 16px/1.5 system-ui, sans-serif; margin: 2rem; color: #222 }
  #state { font-size: 2rem; font-weight: bold }
  #state[data-state="PAID"], #state[data-state="CONFIRMED"] { color: #07c160 }
  #state[data-state="CLOSED"], #state[data-state="FAILED"] { color: #c00 }
  #link { color: #888 } li { font-family: monospace }
</style></head>
<body>
<p>Order <code id="no"></code> <span id="link">connecting…</span></p>
<p id="state" data-state="">…</p>
<ol id="history"></ol>
<script>
(function () {
  var no = decodeURIComponent(location.pathname.split("/")[2]);
  document.getElementById("no").textContent = no;
  var stateEl = document.getElementById("state"), list = document.getElementById("history");
  var link = document.getElementById("link"), version = 0;
  function row(h) {
    var li = document.createElement("li");
    var line = new Date(h.at).toISOString() + "  " + (h.from || "-") + " -> " + h.to;
    li.textContent = line + (h.event ? "  (" + h.event + ")" : "");
    list.appendChild(li);
  }
  function show(state) { stateEl.textContent = state; stateEl.setAttribute("data-state", state); }
  var proto = location.protocol === "https:" ? "wss://" : "ws://";
  var ws = new WebSocket(proto + location.host + "/ws/orders/" + encodeURIComponent(no));
  ws.onopen = function () { link.textContent = "live"; };
  ws.onclose = function () { link.textContent = "disconnected"; };
  ws.onmessage = function (e) {
    var m = JSON.parse(e.data);
    if (m.error) { show(m.error); return; }
    if (m.snapshot) {
      list.textContent = "";
      m.history.forEach(row);
      version = m.version;
      show(m.state);
      return;
    }
    if (m.version <= version) return; // already in the snapshot
    version = m.version;
    row({ at: m.at, from: m.from, to: m.state, event: m.event });
    show(m.state);
  };
})();
</script>
</body></html>
]]

function _M.mount(app)
  app:get("/orders/:out_trade_no/live", function(_req, res)
    res.headers["content-type"] = "text/html; charset=utf-8"
    res.headers["cache-control"] = "no-store"
    return 200, PAGE
  end)

  app:ws("/ws/orders/:out_trade_no", function(ws, req)
    local no = req.params.out_trade_no
    -- Subscribe before reading the order: a transition in between is then
    -- both in the snapshot and a frame, and the page drops the older one.
    assert(ws:subscribe("order/" .. no))
    local o = order.get(no)
    if not o then
      ws:send(json.encode({ error = "not found" }))
      ws:close(1000, "not found")
      return
    end
    ws:send(snapshot(o))
    while ws:receive() do end -- the client says nothing; wait for its close
  end)
  return app
end

return _M
