-- One worker, many waiting requests: the loop never blocks.
local H = require "helpers"
local socket = require "socket"

describe("concurrency", function()
  local srv
  setup(function() srv = H.start(H.app("basic"), { workers = 1 }) end)
  teardown(function() srv:stop(); srv:cleanup() end)

  it("finishes 200 concurrent /sleep?ms=200 together on one worker", function()
    local N = 200
    local conns = {}
    for i = 1, N do
      conns[i] = srv:connect()
    end
    local t0 = socket.gettime()
    for i = 1, N do
      conns[i]:send("GET /sleep?ms=200 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    end
    local ok = 0
    for i = 1, N do
      local out = H.read_all(conns[i], 10)
      conns[i]:close()
      local r = H.parse_responses(out)[1]
      if r and r.status == 200 and r.body == "slept 200\n" then ok = ok + 1 end
    end
    local elapsed = socket.gettime() - t0
    assert.equal(N, ok)
    -- One after another they would take 40 s; together about 0.2 s. The
    -- bound is loose on purpose (shared, noisy machines): it only has to
    -- tell "overlapped" from "serialised".
    assert.is_true(elapsed < 5, string.format("took %.2f s", elapsed))
    print(string.format("\n    200 concurrent /sleep?ms=200 on 1 worker: %.3f s", elapsed))
  end)
end)
