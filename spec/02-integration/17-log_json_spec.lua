-- Every log line is valid JSON in valid UTF-8, whatever bytes a client sent
-- or a handler logged. Checked with an independent strict parser (python3's
-- json module over the log decoded as strict UTF-8), not with our own.
local H = require "helpers"

-- (spec/helpers.lua waits for the pid itself.)
local start = H.start

-- Prints "ok N" when each of the N lines of the file is a JSON object with
-- ts, level and msg, in strict UTF-8, without NaN/Infinity; else names the
-- first bad line and exits 1.
local CHECK = [[
import json, sys
def refuse(name):
    raise ValueError("non-JSON constant " + name)
data = open(sys.argv[1], "rb").read()
if data and not data.endswith(b"\n"):
    print("the last line is not terminated"); sys.exit(1)
n = 0
for i, raw in enumerate(data.split(b"\n")[:-1], 1):
    try:
        v = json.loads(raw.decode("utf-8", errors="strict"), parse_constant=refuse)
        if not isinstance(v, dict) or not {"ts", "level", "msg"} <= v.keys():
            raise ValueError("not a log line object")
    except Exception as e:
        print("line %d: %s: %r" % (i, e, raw[:300])); sys.exit(1)
    n += 1
print("ok %d" % n)
]]

local function check_log(srv)
  local script = srv.dir .. "/check_log.py"
  H.write_file(script, CHECK)
  local out, code = H.sh("python3 " .. script .. " " .. srv.log)
  return out, code
end

-- Request targets with 8-bit bytes (valid and invalid UTF-8), quotes,
-- backslashes and control bytes (those get a 400, and an access line too).
local TARGETS = {
  "/caf\233", "/\255\254", "/\128", "/\192\175", "/\224\128\175", "/\237\160\128",
  "/\240\159\152x", "/\244\144\128\128", "/a\"b\\c\"", "/\195\169/\240\159\152\128",
  "/x\1y", "/x\127y", "/%ff%00",
  -- Longer than the 256 bytes the access line keeps.
  "/" .. string.rep("\228\184\173", 100), "/" .. string.rep("\255", 300),
}

-- Header values carry any byte but CR, LF and NUL.
local HEADER_VALUES = {
  "caf\233", "\255\254\253", "\192\175\237\160\128\240\159\152", "q\"uo\\te", "tab\there",
  "\195\169\240\159\152\128",
}

describe("log lines", function()
  local srv
  before_each(function() srv = start(H.app("logjson"), { workers = 1 }) end)
  after_each(function() srv:stop(); srv:cleanup() end)

  it("are valid JSON in valid UTF-8 whatever the request target, headers and logged strings", function()
    local requests = 0
    for _, target in ipairs(TARGETS) do
      local out = srv:raw("GET " .. target .. " HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
      assert.truthy(out:match("^HTTP/1%.1 [44]0%d"), target)
      requests = requests + 1
    end
    assert.equal("logged\n", srv:get("/log/samples").body)
    requests = requests + 1
    for _, v in ipairs(HEADER_VALUES) do
      assert.equal("logged\n", srv:get("/log/header", { ["X-Msg"] = v }).body)
      assert.equal(500, srv:get("/boom", { ["X-Msg"] = v }).status)
      requests = requests + 2
    end
    -- Access lines are flushed by a timer: wait for all of them.
    H.wait_until(function()
      local _, n = srv:log_text():gsub('"msg":"access"', "")
      return n >= requests
    end, 10, "every access line")
    assert.equal(0, srv:stop())

    local out, code = check_log(srv)
    assert.equal(0, code, out)
    assert.truthy(out:match("^ok %d+"), out)

    local log = srv:log_text()
    -- An invalid byte becomes U+FFFD, written as an escape.
    assert.truthy(log:find('"path":"/caf\\ufffd"', 1, true), "the Latin-1 path")
    assert.truthy(log:find('"path":"/\\ufffd\\ufffd"', 1, true), "bytes never in UTF-8")
    -- A truncated sequence is one U+FFFD (its maximal valid prefix).
    assert.truthy(log:find('"path":"/\\ufffdx"', 1, true), "the truncated sequence")
    -- Quotes and backslashes are escaped; valid UTF-8 passes unchanged.
    assert.truthy(log:find('"path":"/a\\"b\\\\c\\""', 1, true), "quotes in the path")
    assert.truthy(log:find('"path":"/\195\169/\240\159\152\128"', 1, true), "valid UTF-8 in the path")
    assert.truthy(log:find('"msg":"ok: \195\169 \240\159\152\128 \228\184\173 \239\191\189"', 1, true),
      "valid UTF-8 in a message")
    -- A NUL does not end a message early.
    assert.truthy(log:find('"msg":"a\\u0000b"', 1, true), "the message with a NUL")
    assert.truthy(log:find('"sample":"caf\\ufffd"', 1, true), "invalid UTF-8 in a field")
    -- Fields given as a list stay one field; fields with no JSON form are named.
    assert.truthy(log:find('"msg":"list fields","fields":["a","caf\\ufffd"]', 1, true), "list fields")
    assert.truthy(log:find('"msg":"bad fields","log_fields_error":"wxd.json: cannot encode NaN or infinity at $.n"',
      1, true), "fields that cannot be encoded")
  end)
end)
