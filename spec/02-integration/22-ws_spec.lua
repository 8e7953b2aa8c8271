-- WebSocket server (core/ws.c) against our own raw-socket client: the case
-- families of the Autobahn testsuite (framing, ping/pong, reserved bits and
-- opcodes, fragmentation, UTF-8, close handling, limits), each case run
-- twice: the client's bytes in one write, and one byte per write.
local H = require "helpers"
local bit = require "bit"
local wxd = require "wxd"

local char, byte, rep = string.char, string.byte, string.rep

local KEY = "dGhlIHNhbXBsZSBub25jZQ=="

-- ---- a client of our own ----

local function handshake_bytes(path, extra)
  return "GET " .. path .. " HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    .. "Sec-WebSocket-Key: " .. KEY .. "\r\nSec-WebSocket-Version: 13\r\n" .. (extra or "") .. "\r\n"
end

-- Reads an HTTP response head; returns status and lower-cased headers.
local function read_head(c)
  local status, headers = nil, {}
  while true do
    local l, err = c:receive("*l")
    if not l then return nil, err end
    if not status then status = tonumber(l:match("^HTTP/1%.1 (%d+)"))
    elseif l == "" then return status, headers
    else
      local k, v = l:match("^([^:]+):%s*(.-)%s*$")
      headers[k:lower()] = v
    end
  end
end

local function connect(srv, path, extra)
  local c = srv:connect(10)
  assert(c:send(handshake_bytes(path, extra)))
  local status, headers = read_head(c)
  assert.equal(101, status)
  return c, headers
end

local function be(n, bytes)
  local t = {}
  for i = bytes, 1, -1 do
    t[i] = char(n % 256)
    n = math.floor(n / 256)
  end
  return table.concat(t)
end

-- A client frame. o: fin (default true), rsv (bits 0..7 into 0x70), mask
-- (false: unmasked), len (the length to announce, default #payload),
-- form ("16" or "64": force a longer length encoding).
local function frame(op, payload, o)
  o = o or {}
  payload = payload or ""
  local fin = o.fin == false and 0 or 0x80
  local b0 = fin + (o.rsv or 0) * 16 + op
  local len = o.len or #payload
  local masked = o.mask ~= false
  local head
  local mbit = masked and 0x80 or 0
  if o.form == "64" or len > 65535 then head = char(b0, mbit + 127) .. be(len, 8)
  elseif o.form == "16" or len > 125 then head = char(b0, mbit + 126) .. be(len, 2)
  else head = char(b0, mbit + len) end
  if not masked then return head .. payload end
  local key = { 0x37, 0xfa, 0x21, 0x3d }
  local out = {}
  for i = 1, #payload do
    out[i] = char(bit.bxor(byte(payload, i), key[(i - 1) % 4 + 1]))
  end
  return head .. char(key[1], key[2], key[3], key[4]) .. table.concat(out)
end

local function close_frame(code, reason)
  return frame(8, (code and be(code, 2) or "") .. (reason or ""))
end

local function recv_exact(c, n)
  if n == 0 then return "" end
  local s, err, partial = c:receive(n)
  if not s then return nil, err, partial end
  return s
end

-- Reads one server frame: { fin, op, payload, rsv, masked } or nil, err.
local function read_frame(c)
  local h, err = recv_exact(c, 2)
  if not h then return nil, err end
  local b0, b1 = byte(h, 1, 2)
  local len = b1 % 128
  if len == 126 then
    local x = assert(recv_exact(c, 2))
    len = byte(x, 1) * 256 + byte(x, 2)
  elseif len == 127 then
    local x = assert(recv_exact(c, 8))
    len = 0
    for i = 1, 8 do len = len * 256 + byte(x, i) end
  end
  local payload = assert(recv_exact(c, len))
  return { fin = b0 >= 128, op = b0 % 16, rsv = math.floor(b0 / 16) % 8, masked = b1 >= 128, payload = payload }
end

local function close_code(f)
  if #f.payload < 2 then return nil end
  return byte(f.payload, 1) * 256 + byte(f.payload, 2)
end

-- Sends bytes (whole, or one byte per write) and reads every frame until
-- the server's close frame and its EOF. Returns frames and how it ended.
local function run(srv, path, bytes, split)
  local c = connect(srv, path)
  if split then
    for i = 1, #bytes do
      if not c:send(bytes:sub(i, i)) then break end -- the server may fail the connection early
    end
  else
    c:send(bytes)
  end
  local frames = {}
  local ended
  while true do
    local f, err = read_frame(c)
    if not f then ended = err break end
    frames[#frames + 1] = f
    assert.is_false(f.masked, "a server frame must not be masked")
    assert.equal(0, f.rsv)
    if f.op == 8 then
      -- Our close answer (the server may have sent its close first).
      c:send(close_frame(close_code(f) or 1000))
      local rest, rerr = c:receive(1)
      ended = rest and "data after close" or rerr
      break
    end
  end
  c:close()
  return frames, ended
end

local function closing(frames)
  local last = frames[#frames]
  assert.is_truthy(last, "no frame at all")
  assert.equal(8, last.op, "the last frame is not a close frame")
  return close_code(last), last.payload:sub(3)
end

-- The server's close must be on the wire (never 1005/1006 there) and the
-- TCP connection then ends.
local function expect_close(frames, ended, code)
  local got = closing(frames)
  assert.equal(code, got)
  assert.are_not.equal(1005, got)
  assert.are_not.equal(1006, got)
  assert.equal("closed", ended)
end

local function data_frames(frames)
  local out = {}
  for _, f in ipairs(frames) do
    if f.op ~= 8 then out[#out + 1] = f end
  end
  return out
end

describe("websocket server (raw-socket conformance)", function()
  local srv
  setup(function() srv = H.start(H.app("ws"), { workers = 2 }) end)
  teardown(function() srv:stop(); srv:cleanup() end)

  describe("handshake", function()
    it("answers 101 with the RFC 6455 accept key", function()
      local c, h = connect(srv, "/echo")
      assert.equal("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", h["sec-websocket-accept"])
      assert.equal("websocket", h["upgrade"]:lower())
      c:close()
    end)

    local function status_of(req)
      local r = H.parse_responses((srv:raw(req, { timeout = 5 })))[1]
      return r.status, r.headers
    end

    it("takes frames the client sent right behind its handshake, in the same write", function()
      local c = srv:connect(10)
      assert(c:send(handshake_bytes("/echo") .. frame(1, "early") .. frame(9, "p")))
      assert.equal(101, (read_head(c)))
      local f1, f2 = read_frame(c), read_frame(c)
      -- The pong is written by C at once, the echo by the handler.
      local got = { [f1.op] = f1.payload, [f2.op] = f2.payload }
      assert.same({ [1] = "early", [10] = "p" }, got)
      c:close()
    end)

    it("refuses other versions with 426 and names version 13", function()
      local st, h = status_of((handshake_bytes("/echo"):gsub("Version: 13", "Version: 8")))
      assert.equal(426, st)
      assert.equal("13", h["sec-websocket-version"])
    end)

    it("refuses a missing or malformed key", function()
      assert.equal(400, (status_of((handshake_bytes("/echo"):gsub("Sec%-WebSocket%-Key: [^\r]*\r\n", "")))))
      assert.equal(400, (status_of((handshake_bytes("/echo"):gsub(KEY, "c2hvcnQ=")))))
    end)

    it("refuses an Origin not on the allow-list, accepts one on it and a client without Origin", function()
      assert.equal(403, (status_of(handshake_bytes("/echo", "Origin: https://evil.example\r\n"))))
      local c = connect(srv, "/echo", "Origin: https://allowed.example\r\n")
      c:close()
      c = connect(srv, "/any-origin", "Origin: https://evil.example\r\n")
      c:close()
    end)

    it("refuses a request without Upgrade", function()
      local st = status_of("GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
      assert.equal(426, st)
    end)

    it("serves plain HTTP on the same connection type meanwhile", function()
      assert.equal("hello\n", srv:get("/hello").body)
    end)
  end)

  for _, split in ipairs({ false, true }) do
    local mode = split and " (one byte per write)" or ""
    local function case(name, bytes, check, path)
      it(name .. mode, function()
        local frames, ended = run(srv, path or "/echo", bytes, split)
        check(frames, ended)
      end)
    end

    describe("framing" .. mode, function()
      for _, n in ipairs({ 0, 1, 125, 126, 127, 65535, 65536, 100000 }) do
        case("echoes a text message of " .. n .. " bytes", frame(1, rep("*", n)) .. close_frame(1000),
          function(frames, ended)
            local d = data_frames(frames)
            assert.equal(1, #d)
            assert.equal(1, d[1].op)
            assert.equal(n, #d[1].payload)
            assert.equal(rep("*", n), d[1].payload)
            expect_close(frames, ended, 1000)
          end)
      end
      case("echoes binary with every byte value", frame(2, (function()
        local t = {}
        for i = 0, 255 do t[#t + 1] = char(i) end
        return table.concat(t)
      end)()) .. close_frame(1000), function(frames, ended)
        local d = data_frames(frames)
        assert.equal(2, d[1].op)
        assert.equal(256, #d[1].payload)
        assert.equal(255, byte(d[1].payload, 256))
        expect_close(frames, ended, 1000)
      end)
      case("accepts a short payload in the 16- and 64-bit length forms",
        frame(1, "a", { form = "16" }) .. frame(1, "b", { form = "64" }) .. close_frame(1000),
        function(frames, ended)
          local d = data_frames(frames)
          assert.equal("a", d[1].payload)
          assert.equal("b", d[2].payload)
          expect_close(frames, ended, 1000)
        end)
      case("fails an unmasked client frame with 1002", frame(1, "hello", { mask = false }),
        function(frames, ended)
          assert.equal(0, #data_frames(frames))
          expect_close(frames, ended, 1002)
        end)
    end)

    describe("ping/pong" .. mode, function()
      case("answers a ping with its payload", frame(9, "ping!") .. close_frame(1000), function(frames, ended)
        assert.equal(10, frames[1].op)
        assert.equal("ping!", frames[1].payload)
        expect_close(frames, ended, 1000)
      end)
      case("answers a 125-byte ping", frame(9, rep("p", 125)) .. close_frame(1000), function(frames, ended)
        assert.equal(10, frames[1].op)
        assert.equal(rep("p", 125), frames[1].payload)
        expect_close(frames, ended, 1000)
      end)
      case("fails a 126-byte ping with 1002", frame(9, rep("p", 126)), function(frames, ended)
        expect_close(frames, ended, 1002)
        assert.equal(1, #frames)
      end)
      case("fails a fragmented ping with 1002", frame(9, "a", { fin = false }) .. frame(0, "b"),
        function(frames, ended) expect_close(frames, ended, 1002) end)
      case("ignores an unsolicited pong", frame(10, "x") .. frame(1, "after") .. close_frame(1000),
        function(frames, ended)
          assert.equal("after", frames[1].payload)
          expect_close(frames, ended, 1000)
        end)
    end)

    describe("reserved bits" .. mode, function()
      for rsv = 1, 7 do
        case("fails RSV=" .. rsv .. " on a text frame with 1002", frame(1, "x", { rsv = rsv }),
          function(frames, ended)
            assert.equal(0, #data_frames(frames))
            expect_close(frames, ended, 1002)
          end)
      end
      case("fails RSV on a ping with 1002", frame(9, "x", { rsv = 4 }),
        function(frames, ended) expect_close(frames, ended, 1002) end)
      it("fails RSV after a good exchange on the same connection" .. mode, function()
        local c = connect(srv, "/echo")
        c:send(frame(1, "ok"))
        assert.equal("ok", read_frame(c).payload)
        local bad = frame(1, "x", { rsv = 2 })
        for i = 1, split and #bad or 1 do c:send(split and bad:sub(i, i) or bad) end
        local f = read_frame(c)
        assert.equal(8, f.op)
        assert.equal(1002, close_code(f))
        c:close()
      end)
    end)

    describe("opcodes" .. mode, function()
      for _, op in ipairs({ 3, 4, 5, 6, 7, 11, 12, 13, 14, 15 }) do
        case("fails reserved opcode " .. op .. " with 1002", frame(op, "x"),
          function(frames, ended) expect_close(frames, ended, 1002) end)
      end
    end)

    describe("fragmentation" .. mode, function()
      case("joins a text message in three fragments",
        frame(1, "frag", { fin = false }) .. frame(0, "men", { fin = false }) .. frame(0, "ted") .. close_frame(1000),
        function(frames, ended)
          local d = data_frames(frames)
          assert.equal(1, #d)
          assert.equal("fragmented", d[1].payload)
          expect_close(frames, ended, 1000)
        end)
      case("answers pings between fragments and keeps the message whole",
        frame(2, "ab", { fin = false }) .. frame(9, "p1") .. frame(0, "cd", { fin = false }) .. frame(9, "p2")
          .. frame(0, "ef") .. close_frame(1000),
        function(frames, ended)
          assert.equal(10, frames[1].op)
          assert.equal("p1", frames[1].payload)
          assert.equal(10, frames[2].op)
          assert.equal("p2", frames[2].payload)
          assert.equal(2, frames[3].op)
          assert.equal("abcdef", frames[3].payload)
          expect_close(frames, ended, 1000)
        end)
      case("fails a continuation without a message with 1002", frame(0, "x"),
        function(frames, ended) expect_close(frames, ended, 1002) end)
      case("fails a new message inside a fragmented one with 1002",
        frame(1, "a", { fin = false }) .. frame(1, "b"),
        function(frames, ended)
          assert.equal(0, #data_frames(frames))
          expect_close(frames, ended, 1002)
        end)
      case("accepts empty fragments", frame(1, "", { fin = false }) .. frame(0, "", { fin = false }) .. frame(0, "")
        .. close_frame(1000), function(frames, ended)
          assert.equal("", data_frames(frames)[1].payload)
          expect_close(frames, ended, 1000)
        end)
    end)

    describe("utf-8" .. mode, function()
      local kosme = "\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5"
      case("echoes valid multi-byte text", frame(1, kosme .. "\xf0\x9f\x98\x80") .. close_frame(1000),
        function(frames, ended)
          assert.equal(kosme .. "\xf0\x9f\x98\x80", frames[1].payload)
          expect_close(frames, ended, 1000)
        end)
      case("accepts code points split across fragments",
        frame(1, "\xce", { fin = false }) .. frame(0, "\xba\xe1", { fin = false })
          .. frame(0, "\xbd\xb9\xf0\x9f", { fin = false }) .. frame(0, "\x98\x80") .. close_frame(1000),
        function(frames, ended)
          assert.equal("\xce\xba\xe1\xbd\xb9\xf0\x9f\x98\x80", frames[1].payload)
          expect_close(frames, ended, 1000)
        end)
      for name, bad in pairs({
        surrogate = "ab\xed\xa0\x80cd", overlong = "\xc0\xaf", ["above U+10FFFF"] = "\xf4\x90\x80\x80",
        ["lone continuation"] = "\x80", ["0xFF"] = "a\xff", ["truncated at the end"] = kosme .. "\xce",
        ["overlong 3-byte"] = "\xe0\x80\xaf",
      }) do
        case("fails invalid utf-8 (" .. name .. ") with 1007", frame(1, bad), function(frames, ended)
          assert.equal(0, #data_frames(frames))
          expect_close(frames, ended, 1007)
        end)
      end
      case("fails invalid utf-8 split across fragments with 1007",
        frame(1, "ok\xed", { fin = false }) .. frame(0, "\xa0\x80", { fin = true }),
        function(frames, ended)
          assert.equal(0, #data_frames(frames))
          expect_close(frames, ended, 1007)
        end)
      case("fails invalid utf-8 at once, before the message ends",
        frame(1, "ok\xff", { fin = false }),
        function(frames, ended) expect_close(frames, ended, 1007) end)
      case("fails text ending inside a code point across fragments",
        frame(1, "ok", { fin = false }) .. frame(0, "\xf0\x9f\x98"),
        function(frames, ended) expect_close(frames, ended, 1007) end)
    end)

    describe("close" .. mode, function()
      case("answers a close without a code with an empty close (1005 stays off the wire)", frame(8, ""),
        function(frames, ended)
          assert.equal(1, #frames)
          assert.equal(8, frames[1].op)
          assert.equal("", frames[1].payload)
          assert.equal("closed", ended)
        end)
      for _, code in ipairs({ 1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999 }) do
        case("echoes valid close code " .. code, close_frame(code, "why"), function(frames, ended)
          expect_close(frames, ended, code)
        end)
      end
      for _, code in ipairs({ 0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535 }) do
        case("fails invalid close code " .. code .. " with 1002", close_frame(code),
          function(frames, ended) expect_close(frames, ended, 1002) end)
      end
      case("fails a 1-byte close payload with 1002", frame(8, "\3"),
        function(frames, ended) expect_close(frames, ended, 1002) end)
      case("fails a close reason that is not utf-8 with 1007", close_frame(1000, "\xff\xfe"),
        function(frames, ended) expect_close(frames, ended, 1007) end)
      case("echoes a close with a 123-byte reason", close_frame(1000, rep("r", 123)),
        function(frames, ended) expect_close(frames, ended, 1000) end)
      case("ignores data after the client's close", close_frame(1000) .. frame(1, "late"),
        function(frames, ended)
          assert.equal(0, #data_frames(frames))
          expect_close(frames, ended, 1000)
        end)
      case("closes with the handler's code and reason", frame(1, "close-me"), function(frames, ended)
        local code, reason = closing(frames)
        assert.equal(4000, code)
        assert.equal("bye", reason)
        assert.equal("closed", ended)
      end)
    end)

    describe("limits" .. mode, function()
      case("fails a frame announced over max_frame_bytes with 1009 before its payload",
        frame(1, "", { len = 101 }):sub(1, 8), -- header and mask only: no payload sent
        function(frames, ended) expect_close(frames, ended, 1009) end, "/small")
      case("fails a message over max_message_bytes with 1009",
        frame(1, rep("a", 100), { fin = false }) .. frame(0, rep("b", 100), { fin = false }) .. frame(0, "c"),
        function(frames, ended)
          assert.equal(0, #data_frames(frames))
          expect_close(frames, ended, 1009)
        end, "/small")
      case("accepts a message at exactly max_message_bytes",
        frame(1, rep("a", 100), { fin = false }) .. frame(0, rep("b", 100)) .. close_frame(1000),
        function(frames, ended)
          assert.equal(200, #data_frames(frames)[1].payload)
          expect_close(frames, ended, 1000)
        end, "/small")
      case("fails a 2^62-byte frame header with 1009", frame(2, "", { len = 2 ^ 62 }):sub(1, 14),
        function(frames, ended) expect_close(frames, ended, 1009) end)
      case("fails a 64-bit length with the high bit set with 1002",
        char(0x82, 0xff, 0x80, 0, 0, 0, 0, 0, 0, 1, 1, 2, 3, 4),
        function(frames, ended) expect_close(frames, ended, 1002) end)
    end)
  end

  describe("the Lua side", function()
    it("ws:receive(timeout) returns nil, timeout", function()
      local frames = run(srv, "/timeout", "", false)
      assert.equal("nil timeout", frames[1].payload)
      assert.equal(1000, close_code(frames[2]))
    end)

    it("a handler that raises closes with 1011", function()
      local frames, ended = run(srv, "/fails", "", false)
      expect_close(frames, ended, 1011)
      H.wait_until(function() return #srv:log_lines("websocket handler error") > 0 end, 5, "the error logged")
    end)
  end)

  describe("timeouts and backpressure", function()
    it("pings a silent client, then closes it with 1001 at the idle timeout", function()
      local c = connect(srv, "/idle")
      c:settimeout(10)
      local f = assert(read_frame(c))
      assert.equal(9, f.op)
      f = assert(read_frame(c))
      assert.equal(8, f.op)
      assert.equal(1001, close_code(f))
      c:close()
    end)

    it("keeps a client that answers pings", function()
      local c = connect(srv, "/idle")
      c:settimeout(10)
      for _ = 1, 3 do
        local f = assert(read_frame(c))
        assert.equal(9, f.op)
        c:send(frame(10, f.payload))
      end
      c:send(frame(1, "still here"))
      c:send(close_frame(1000))
      local seen = {}
      while true do
        local f = read_frame(c)
        if not f then break end
        seen[#seen + 1] = f.op
        if f.op == 8 then
          assert.equal(1000, close_code(f))
          break
        end
      end
      c:close()
      assert.equal(8, seen[#seen])
    end)

    it("disconnects a subscriber that does not read instead of buffering without bound", function()
      local c = connect(srv, "/mute?topic=slow")
      local hello = assert(read_frame(c))
      assert.truthy(hello.payload:find("^subscribed"))
      -- 40 MB published while the client reads nothing: far beyond the
      -- kernel's buffers and max_unsent_bytes (1 MiB).
      for _ = 1, 20 do
        local r = srv:get("/publish-many?topic=slow&n=32&size=65536")
        assert.equal(200, r.status)
        if #srv:log_lines("does not read its messages") > 0 then break end
      end
      H.wait_until(function() return #srv:log_lines("does not read its messages") > 0 end, 10, "the disconnect")
      -- What the kernel had taken is readable, then the connection ends.
      c:settimeout(10)
      local total, err = 0
      while true do
        local data, e, partial = c:receive(65536)
        total = total + #(data or partial or "")
        if not data then err = e break end
      end
      assert.is_true(err == "closed" or err == "connection reset by peer", tostring(err))
      assert.is_true(total < 40 * 1024 * 1024)
      c:close()
    end)

    it("drops slow readers in the middle of a delivery whose handlers then unsubscribe", function()
      local conns = {}
      for i = 1, 3 do
        conns[i] = connect(srv, "/sub-then-unsub?topic=walk")
        assert.truthy(read_frame(conns[i]).payload:find("^subscribed"))
      end
      local before = #srv:log_lines("does not read its messages")
      for _ = 1, 20 do
        srv:get("/publish-many?topic=walk&n=32&size=65536")
        if #srv:log_lines("does not read its messages") >= before + 3 then break end
      end
      H.wait_until(function() return #srv:log_lines("does not read its messages") >= before + 3 end, 10,
        "the three disconnects")
      for _, c in ipairs(conns) do c:close() end
      -- The topic is gone with its last subscriber: a publish reaches nobody.
      H.wait_until(function() return srv:get_json("/publish-many?topic=walk&n=1&size=1").reached == 0 end, 10,
        "the topic to be empty")
      srv:check_sanitizers()
    end)

    it("ws:send waits for a slow reader and goes on when it reads", function()
      local c = connect(srv, "/flood?n=200&size=65536")
      -- 13 MB: ws:send must wait (max_unsent_bytes is 1 MiB); read it all.
      local n = 0
      while n < 200 do
        local f = assert(read_frame(c))
        assert.equal(65536, #f.payload)
        n = n + 1
      end
      H.wait_until(function() return srv:get_json("/state?k=flood").value == "done" end, 10, "the flood to end")
      c:close()
    end)
  end)

  it("left no sanitizer report", function() srv:check_sanitizers() end)
end)


describe("websocket connections across a reload and at shutdown", function()
  local srv, admin
  before_each(function()
    admin = H.free_port()
    srv = H.start(H.app("ws"), { workers = 1, pid = true, args = "--admin 127.0.0.1:" .. admin })
  end)
  after_each(function() srv:stop(); srv:cleanup() end)

  local function ask(c, text)
    c:send(frame(1, text))
    return assert(read_frame(c)).payload
  end

  it("survives a hot reload: the handler goes on in its generation, new connections get the new one", function()
    local c = connect(srv, "/echo")
    assert.equal("gen 1 worker 0", ask(c, "gen?"))
    srv:signal("HUP")
    H.wait_until(function() return srv:get("/gen").body == "gen 2\n" end, 10, "generation 2")
    -- Same connection, same handler coroutine: still generation 1's code.
    assert.equal("gen 1 worker 0", ask(c, "gen?"))
    assert.equal(1, H.status(admin).workers[1].retired_generations)
    local c2 = connect(srv, "/echo")
    assert.equal("gen 2 worker 0", ask(c2, "gen?"))
    -- The old generation is freed once its last handler ends.
    c:send(close_frame(1000))
    assert.equal(8, read_frame(c).op)
    c:close()
    H.wait_until(function() return H.status(admin).workers[1].retired_generations == 0 end, 10,
      "the old generation to be freed")
    assert.equal("still", ask(c2, "still"))
    c2:close()
  end)

  it("closes open websockets with 1001 on SIGTERM and exits without waiting for the deadline", function()
    local c = connect(srv, "/echo")
    assert.equal("x", ask(c, "x"))
    srv:signal("TERM")
    local f = assert(read_frame(c))
    assert.equal(8, f.op)
    assert.equal(1001, close_code(f))
    c:send(close_frame(1001))
    c:close()
    H.wait_until(function() return srv:exit_code() end, 8, "wxd to exit")
    assert.equal(0, srv:exit_code())
    assert.equal(0, #srv:log_lines("shutdown deadline reached"))
  end)
end)

describe("websocket cluster topics over Redis", function()
  local url = os.getenv("WXD_TEST_REDIS_URL")
  local a, b
  setup(function()
    if not url then return end
    local env = "WXD_TEST_REDIS_URL=" .. url
    a = H.start(H.app("ws_cluster"), { workers = 2, env = env })
    b = H.start(H.app("ws_cluster"), { workers = 2, env = env })
  end)
  teardown(function()
    if a then a:stop(); a:cleanup() end
    if b then b:stop(); b:cleanup() end
  end)

  -- Pub/sub subscriptions start asynchronously: publish until one arrives.
  local function until_delivered(c, publish, text)
    c:settimeout(0.2)
    return H.wait_until(function()
      publish()
      local f = read_frame(c)
      while f and f.payload ~= text do f = read_frame(c) end
      return f ~= nil
    end, 15, "delivery of " .. text)
  end

  it("delivers a publish made on another node", function()
    if not url then pending("no WXD_TEST_REDIS_URL: run with spec/run.sh") return end
    local c = connect(a, "/sub?topic=order/7")
    assert.truthy(read_frame(c).payload:find("^subscribed"))
    until_delivered(c, function()
      local r = b:get("/publish?topic=order/7&text=PAID")
      assert.equal(200, r.status, r.body)
    end, "PAID")
    c:close()
  end)

  it("delivers any PUBLISH on wxd:topic:<topic> (what the order script does)", function()
    if not url then pending("no WXD_TEST_REDIS_URL: run with spec/run.sh") return end
    local port = url:match(":(%d+)/")
    local c = connect(b, "/sub?topic=order/8")
    assert.truthy(read_frame(c).payload:find("^subscribed"))
    until_delivered(c, function()
      H.sh("redis-cli -p " .. port .. " PUBLISH wxd:topic:order/8 '{\"state\":\"CLOSED\"}'")
    end, '{"state":"CLOSED"}')
    c:close()
  end)
end)

-- Raises this process's descriptor limit to the hard limit (wxd does the
-- same for itself); returns the limit now in force.
local function raise_nofile()
  local ffi = require "ffi"
  pcall(ffi.cdef, "struct wxd_rlimit { unsigned long cur, max; };"
    .. "int getrlimit(int, struct wxd_rlimit *); int setrlimit(int, const struct wxd_rlimit *);")
  local RLIMIT_NOFILE = 7
  local rl = ffi.new("struct wxd_rlimit")
  if ffi.C.getrlimit(RLIMIT_NOFILE, rl) ~= 0 then return 0 end
  if rl.cur < rl.max then
    rl.cur = rl.max
    ffi.C.setrlimit(RLIMIT_NOFILE, rl)
    ffi.C.getrlimit(RLIMIT_NOFILE, rl)
  end
  return tonumber(rl.cur)
end

local function rss_kib(pid)
  for l in io.lines("/proc/" .. pid .. "/status") do
    local v = l:match("^VmRSS:%s+(%d+)")
    if v then return tonumber(v) end
  end
end

-- Opens n WebSocket connections to path (handshake done on each).
local function open_many(srv, path, n, into)
  local req = handshake_bytes(path)
  for _ = 1, n do
    local c = srv:connect(30)
    assert(c:send(req))
    assert.equal(101, (read_head(c)))
    into[#into + 1] = c
  end
  return into
end

describe("websocket scale", function()
  it("holds 10,000 idle connections at a few KiB each, every one still answering", function()
    local N = 10000
    local limit = raise_nofile()
    if limit < N + 500 then
      pending("the descriptor hard limit is " .. limit .. ": 10,000 connections need " .. (N + 500))
      return
    end
    local srv = H.start(H.app("ws"), { workers = 1, env = "WXD_ACCESS_LOG=off" })
    local conns = {}
    local ok, err = pcall(function()
      -- Warm up: pools, the coroutine cache, malloc's arenas.
      open_many(srv, "/echo", 200, conns)
      wxd.sleep(300)
      local before = rss_kib(srv.pid)
      open_many(srv, "/echo", N, conns)
      wxd.sleep(300)
      local after = rss_kib(srv.pid)
      local per = (after - before) / N
      print(string.format("\n  10,000 idle websocket connections: RSS %d -> %d KiB, %.2f KiB per connection", before,
        after, per))
      -- Each connection holds its handler's coroutine (blocked in
      -- receive), its request table and the connection's C state; no read
      -- buffer. Sanitizers multiply allocations: no figure to hold there.
      if not os.getenv("WXD_SANITIZED") then assert.is_true(per <= 4, string.format("%.2f KiB per connection", per)) end
      for i = 1, #conns, 997 do
        conns[i]:send(frame(1, "alive " .. i))
        assert.equal("alive " .. i, read_frame(conns[i]).payload)
      end
    end)
    for _, c in ipairs(conns) do c:close() end
    srv:stop(); srv:cleanup()
    assert(ok, err)
  end)

  it("10 hot reloads under HTTP load with 100 websockets connected: no failed request, no dropped socket", function()
    local srv = H.start(H.app("ws"), { workers = 2, env = "WXD_ACCESS_LOG=off" })
    local dir = H.tmpdir()
    local stop, out = dir .. "/stop", dir .. "/load.out"
    local conns = {}
    local ok, err = pcall(function()
      open_many(srv, "/echo", 100, conns)
      for i, c in ipairs(conns) do
        c:send(frame(1, "gen?"))
        assert.truthy(read_frame(c).payload:find("^gen 1 "), "connection " .. i)
      end
      os.execute(string.format("(%s script %s/spec/fixtures/http_load.lua %d /hello 8 %s %s >%s/load.log 2>&1) &",
        H.WXD, H.ROOT, srv.port, stop, out, dir))
      for gen = 2, 11 do
        srv:signal("HUP")
        H.wait_until(function() return srv:get("/gen").body == "gen " .. gen .. "\n" end, 15, "generation " .. gen)
        -- Every websocket still answers (its handler on its own generation).
        for i, c in ipairs(conns) do
          c:send(frame(1, "r" .. gen))
          local f = read_frame(c)
          assert.is_truthy(f, "websocket " .. i .. " dropped after reload " .. (gen - 1))
          assert.equal("r" .. gen, f.payload)
        end
      end
      H.write_file(stop, "")
      local result = H.wait_until(function() return H.read_file(out) end, 30, "the load to stop")
      local good, failed = result:match("ok (%d+) failed (%d+)")
      print(string.format("\n  10 reloads under load: %s HTTP requests answered, %s failed; 100/100 websockets kept",
        good, failed))
      assert.equal("0", failed, result)
      assert.is_true(tonumber(good) > 0)
    end)
    H.write_file(stop, "")
    for _, c in ipairs(conns) do c:close() end
    srv:stop(); srv:cleanup()
    os.execute("rm -rf " .. dir)
    assert(ok, err)
  end)
end)
