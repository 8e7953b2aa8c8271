-- WebSocket server against an independent client, the npm `ws` package
-- (installed by make deps into build/spec/node): the ordinary paths (text,
-- binary, a large message, an empty one, the close handshake) and a topic
-- publish made on another worker reaching a subscriber.
local H = require "helpers"

local NODE_MODULES = H.ROOT .. "/build/spec/node/node_modules"
local CLIENT = H.ROOT .. "/spec/fixtures/ws_node_client.js"

local function have_ws()
  return H.read_file(NODE_MODULES .. "/ws/package.json") ~= nil
end

-- Starts the client in the background; returns the file its lines go to.
local function node(dir, name, args)
  local out = dir .. "/" .. name .. ".out"
  os.execute(string.format("(NODE_PATH=%s node %s %s >%s 2>&1; echo \"exit $?\" >>%s) >/dev/null 2>&1 &",
    NODE_MODULES, CLIENT, args, out, out))
  return out
end

local function lines(file)
  local t = {}
  for l in (H.read_file(file) or ""):gmatch("[^\n]+") do t[#t + 1] = l end
  return t
end

describe("websocket server with the npm ws client", function()
  if not have_ws() then
    -- make deps installs it; without npm or the registry there is no peer.
    pending("npm ws is not installed in build/spec/node (run make deps)")
    return
  end

  local srv, dir
  setup(function()
    dir = H.tmpdir()
    srv = H.start(H.app("ws"), { workers = 2 })
  end)
  teardown(function()
    srv:stop(); srv:cleanup()
    os.execute("rm -rf " .. dir)
  end)

  it("echoes text, binary, a 1.2 MB message and an empty one, then closes with 1000", function()
    local out = node(dir, "echo", "echo ws://127.0.0.1:" .. srv.port .. "/echo")
    H.wait_until(function() return (H.read_file(out) or ""):find("exit %d") end, 60, "the node client to end")
    local l = lines(out)
    assert.equal("echo ok 4 messages, 1228800 bytes the largest", l[1], table.concat(l, "\n"))
    assert.equal("close 1000", l[2])
    assert.equal("exit 0", l[3])
  end)

  it("delivers a publish made on another worker to a subscriber", function()
    local out = node(dir, "sub", "sub 'ws://127.0.0.1:" .. srv.port .. "/sub?topic=order/42' 2")
    local worker = H.wait_until(function() return (H.read_file(out) or ""):match("ready (%d+)") end, 30,
      "the subscription")
    -- Publish from the other worker: connections are spread by hash, so
    -- new connections are tried until one lands there (the fixture answers
    -- 409 on the subscriber's worker and publishes nothing).
    local texts = { "PAID", "CONFIRMED" }
    local sent = 0
    H.wait_until(function()
      local r = srv:get("/publish-elsewhere?not=" .. worker .. "&topic=order/42&text=" .. texts[sent + 1])
      if r.status == 200 then
        assert.equal('"workers":1', r.body:match('"workers":%d+'))
        sent = sent + 1
      end
      return sent == 2
    end, 30, "two publishes from the other worker")
    H.wait_until(function() return (H.read_file(out) or ""):find("exit %d") end, 30, "the node client to end")
    assert.same({ "ready " .. worker, "msg PAID", "msg CONFIRMED", "exit 0" }, lines(out))
  end)

  it("left no sanitizer report", function() srv:check_sanitizers() end)
end)

describe("websocket over TLS (wss) with the npm ws client", function()
  if not have_ws() then
    pending("npm ws is not installed in build/spec/node (run make deps)")
    return
  end

  local srv, app
  setup(function()
    app = H.tmpdir()
    local out, code = H.sh(string.format([[
      cp -r %s/. %s/ && cd %s &&
      openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout key.pem -out cert.pem \
        -days 2 -subj /CN=localhost -addext subjectAltName=IP:127.0.0.1 2>&1]], H.app("ws"), app, app))
    assert(code == 0, out)
    H.write_file(app .. "/config.lua", [[
return {
  shdict = { state = "1m" },
  websocket = { max_message_bytes = 4194304, max_frame_bytes = 4194304 },
  https = { listen = "127.0.0.1:8443", cert = "cert.pem", key = "key.pem" },
}
]])
    local hport = H.free_port()
    srv = H.start(app, { workers = 2, args = "--https-listen 127.0.0.1:" .. hport })
    srv.https_port = hport
  end)
  teardown(function()
    srv:stop(); srv:cleanup()
    os.execute("rm -rf " .. app)
  end)

  it("echoes text, binary, a 1.2 MB message and an empty one over wss", function()
    local out = app .. "/wss.out"
    os.execute(string.format("(NODE_EXTRA_CA_CERTS=%s/cert.pem NODE_PATH=%s node %s echo wss://127.0.0.1:%d/echo >%s 2>&1;"
      .. " echo \"exit $?\" >>%s) >/dev/null 2>&1 &", app, NODE_MODULES, CLIENT, srv.https_port, out, out))
    H.wait_until(function() return (H.read_file(out) or ""):find("exit %d") end, 60, "the node client to end")
    local l = lines(out)
    assert.equal("echo ok 4 messages, 1228800 bytes the largest", l[1], table.concat(l, "\n"))
    assert.equal("close 1000", l[2])
  end)

  it("left no sanitizer report", function() srv:check_sanitizers() end)
end)
