-- Micro-benchmark of wxd.app's hot path: app:handle() on a raw request
-- table like the one the core builds, without any I/O.
--
--   build/wxd script spec/bench/app_handle.lua [N]   (from the repository root;
--   wxd.app needs the native wxd.json, so plain luajit cannot run it)
--
-- Each case builds a fresh raw table per call (as the core does), so the
-- figures include that allocation. They measure the Lua side only; use
-- spec/bench/run.sh for the whole server.

package.path = "./lua/?.lua;./lua/?/init.lua;" .. package.path

local wxd_app = require("wxd.app")
local N = tonumber(arg and arg[1]) or 1e6

local app = wxd_app.new()
app:get("/hello", function() return "hello world\n" end)
app:get("/json", function() return { message = "hello world" } end)
app:get("/orders/:id", function(req) return req.params.id end)
for i = 1, 50 do
    app:get("/r" .. i, function() return "x" end)
    app:get("/r" .. i .. "/:id/items", function() return "x" end)
end

local mw = wxd_app.new()
mw:before(function(req) if req.headers["x-deny"] then return 403, "no" end end)
mw:after(function(_req, res) res.headers["x-powered-by"] = "wxd" end)
mw:get("/hello", function() return "hello world\n" end)

local function run(name, a, method, path)
    local sink = 0
    local t0 = os.clock()
    for _ = 1, N do
        local raw = {
            method = method, path = path, query = "", version = "1.1",
            headers = { host = "127.0.0.1:8080", accept = "*/*" },
            body = "", remote_addr = "127.0.0.1", remote_port = 40000, id = "r1",
        }
        local status = a:handle(raw)
        sink = sink + status
    end
    local dt = os.clock() - t0
    assert(sink > 0)
    print(string.format("%-28s %7.0f ns/call  %6.2f M calls/s", name, dt / N * 1e9, N / dt / 1e6))
end

print(string.format("wxd.app handle(), %d calls per case, %s", N, jit and jit.version or _VERSION))
run("static GET /hello", app, "GET", "/hello")
run("static GET /json (wxd.json)", app, "GET", "/json")
run("param GET /orders/:id", app, "GET", "/orders/12345")
run("404", app, "GET", "/nope")
run("static + before/after", mw, "GET", "/hello")
