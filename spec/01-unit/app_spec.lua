-- Unit specs for wxd.app: router, middleware, request and response.
-- Runs inside wxd (spec/run.sh): wxd.app encodes JSON with the native wxd.json.

local wxd_app = require("wxd.app")
local cjson = require("cjson")

-- A raw request as the core builds it.
local function raw(method, path, opts)
    opts = opts or {}
    return {
        method      = method,
        path        = path,
        query       = opts.query or "",
        version     = opts.version or "1.1",
        headers     = opts.headers or {},
        body        = opts.body or "",
        remote_addr = "127.0.0.1",
        remote_port = 54321,
        id          = opts.id or "req-1",
    }
end

-- Call app:handle and return a table that is easy to assert on.
local function call(app, method, path, opts)
    local status, headers, body = app:handle(raw(method, path, opts))
    local h = {}
    if headers then
        for k, v in pairs(headers) do
            h[string.lower(k)] = v
        end
    end
    return { status = status, headers = h, body = body, raw_headers = headers }
end

local function new()
    return wxd_app.new()
end

describe("wxd.app", function()

    describe("url helpers", function()
        it("url_decode decodes escapes and leaves invalid ones as they are", function()
            assert.equal("a b", wxd_app.url_decode("a%20b"))
            assert.equal("/", wxd_app.url_decode("%2F"))
            assert.equal("%zz", wxd_app.url_decode("%zz"))
            assert.equal("100%", wxd_app.url_decode("100%"))
            assert.equal("%4", wxd_app.url_decode("%4"))
            assert.equal("é", wxd_app.url_decode("%C3%A9"))
        end)

        it("url_decode keeps '+' unless asked (paths vs queries)", function()
            assert.equal("a+b", wxd_app.url_decode("a+b"))
            assert.equal("a b", wxd_app.url_decode("a+b", true))
            assert.equal("a+b", wxd_app.url_decode("a%2Bb", true))
        end)

        it("url_encode encodes all but unreserved characters", function()
            assert.equal("a%20b%2Fc~_.-", wxd_app.url_encode("a b/c~_.-"))
            assert.equal("x", wxd_app.url_decode(wxd_app.url_encode("x")))
        end)

        it("parse_query handles the edge cases", function()
            assert.same({}, wxd_app.parse_query(""))
            assert.same({}, wxd_app.parse_query(nil))
            assert.same({}, wxd_app.parse_query("&&"))
            assert.same({ a = "", b = "" }, wxd_app.parse_query("a=&b"))
            assert.same({ a = "2" }, wxd_app.parse_query("a=1&a=2"))
            assert.same({ a = { "1", "2" }, b = { "" } }, wxd_app.parse_query("a=1&b&a=2", true))
            assert.same({ q = "x y", ["k k"] = "v+" }, wxd_app.parse_query("q=x+y&k+k=v%2B"))
            assert.same({ bad = "%zz", pct = "50%" }, wxd_app.parse_query("bad=%zz&pct=50%"))
            assert.same({ a = "b=c" }, wxd_app.parse_query("a=b=c"))
            assert.same({ b = "1" }, wxd_app.parse_query("=x&b=1"))
        end)

        it("parse_query (native) agrees with a plain Lua reading of the rules on random input", function()
            -- The reference: split on '&', the first '=' splits a pair, '+'
            -- then %XX decoded (an invalid escape kept), empty names skipped.
            local function decode(s)
                s = s:gsub("%+", " ")
                return (s:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
            end
            local function reference(s, all)
                local t, n = {}, 0
                for pair in (s .. "&"):gmatch("([^&]*)&") do
                    if pair ~= "" then
                        n = n + 1
                        if n > wxd_app.MAX_PARAMS then break end
                        local k, v = pair:match("^([^=]*)=(.*)$")
                        if not k then k, v = pair, "" end
                        if k ~= "" then
                            k, v = decode(k), decode(v)
                            -- In the lists of all values, a[] is a.
                            if all and #k > 2 and k:sub(-2) == "[]" then k = k:sub(1, -3) end
                            if all then
                                t[k] = t[k] or {}
                                table.insert(t[k], v)
                            else
                                t[k] = v
                            end
                        end
                    end
                end
                return t
            end
            local alphabet = { "a", "b", "=", "&", "+", "%", "2", "B", "f", "z", "%41", "%2b", "\0", "\255", "é", "[]", "%5B%5d" }
            math.randomseed(12345)
            for _ = 1, 3000 do
                local parts = {}
                for i = 1, math.random(0, 24) do parts[i] = alphabet[math.random(#alphabet)] end
                local s = table.concat(parts)
                assert.same(reference(s), wxd_app.parse_query(s), s)
                assert.same(reference(s, true), wxd_app.parse_query(s, true), s)
            end
        end)

        it("parse_query stops after MAX_PARAMS pairs", function()
            local parts = {}
            for i = 1, wxd_app.MAX_PARAMS + 10 do
                parts[i] = "k" .. i .. "=v"
            end
            local t = wxd_app.parse_query(table.concat(parts, "&"))
            local n = 0
            for _ in pairs(t) do n = n + 1 end
            assert.equal(wxd_app.MAX_PARAMS, n)
        end)
    end)

    describe("routing", function()
        it("serves a static route", function()
            local app = new()
            app:get("/hello", function() return "hello world\n" end)
            local r = call(app, "GET", "/hello")
            assert.equal(200, r.status)
            assert.equal("hello world\n", r.body)
            assert.equal("text/plain; charset=utf-8", r.headers["content-type"])
        end)

        it("serves the root path", function()
            local app = new()
            app:get("/", function() return "root" end)
            assert.equal("root", call(app, "GET", "/").body)
            assert.equal(404, call(app, "GET", "//").status)
        end)

        it("matches :params on one non-empty segment", function()
            local app = new()
            app:get("/orders/:id", function(req) return req.params.id end)
            app:get("/users/:uid/orders/:oid", function(req)
                return req.params.uid .. "|" .. req.params.oid
            end)
            assert.equal("42", call(app, "GET", "/orders/42").body)
            assert.equal("7|9", call(app, "GET", "/users/7/orders/9").body)
            assert.equal(404, call(app, "GET", "/orders/").status)
            assert.equal(404, call(app, "GET", "/orders").status)
            assert.equal(404, call(app, "GET", "/orders/1/2").status)
            assert.equal(404, call(app, "GET", "/users//orders/9").status)
        end)

        it("percent-decodes params but keeps '+'", function()
            local app = new()
            app:get("/orders/:id", function(req) return req.params.id end)
            assert.equal("a b", call(app, "GET", "/orders/a%20b").body)
            assert.equal("a/b", call(app, "GET", "/orders/a%2Fb").body)
            assert.equal("a+b", call(app, "GET", "/orders/a+b").body)
            assert.equal("%zz", call(app, "GET", "/orders/%zz").body)
        end)

        it("matches an unnamed wildcard on the rest of the path", function()
            local app = new()
            app:get("/static/*", function(req) return "[" .. req.params["*"] .. "]" end)
            assert.equal("[a.css]", call(app, "GET", "/static/a.css").body)
            assert.equal("[css/a b.css]", call(app, "GET", "/static/css/a%20b.css").body)
            assert.equal("[]", call(app, "GET", "/static/").body)
            assert.equal("[a/]", call(app, "GET", "/static/a/").body)
            assert.equal(404, call(app, "GET", "/static").status)
        end)

        it("names a wildcard with *name", function()
            local app = new()
            app:get("/files/*path", function(req) return req.params.path end)
            assert.equal("x/y.txt", call(app, "GET", "/files/x/y.txt").body)
        end)

        it("combines params and a wildcard", function()
            local app = new()
            app:get("/u/:user/files/*rest", function(req)
                return req.params.user .. ":" .. req.params.rest
            end)
            assert.equal("bob:a/b", call(app, "GET", "/u/bob/files/a/b").body)
        end)

        it("a root wildcard matches everything", function()
            local app = new()
            app:get("/*", function(req) return "<" .. req.params["*"] .. ">" end)
            assert.equal("<>", call(app, "GET", "/").body)
            assert.equal("<a/b>", call(app, "GET", "/a/b").body)
        end)

        it("prefers static over param over wildcard", function()
            local app = new()
            app:get("/a/new", function() return "static" end)
            app:get("/a/:id", function() return "param" end)
            app:get("/a/*", function() return "wild" end)
            assert.equal("static", call(app, "GET", "/a/new").body)
            assert.equal("param", call(app, "GET", "/a/7").body)
            assert.equal("wild", call(app, "GET", "/a/7/x").body)
            assert.equal("wild", call(app, "GET", "/a/").body)
        end)

        it("backtracks when a more specific branch does not match", function()
            local app = new()
            app:get("/a/b/c", function() return "static" end)
            app:get("/a/b/:x/d", function() return "static-then-param" end)
            app:get("/a/:x/c/e", function() return "param-then-static" end)
            app:get("/a/*", function() return "wild" end)
            assert.equal("static", call(app, "GET", "/a/b/c").body)
            assert.equal("static-then-param", call(app, "GET", "/a/b/z/d").body)
            assert.equal("param-then-static", call(app, "GET", "/a/b/c/e").body)
            assert.equal("wild", call(app, "GET", "/a/b/c/f").body)
        end)

        it("falls back to a less specific route that has the method", function()
            local app = new()
            app:post("/a/new", function() return "static post" end)
            app:get("/a/:id", function(req) return "param get " .. req.params.id end)
            assert.equal("static post", call(app, "POST", "/a/new").body)
            assert.equal("param get new", call(app, "GET", "/a/new").body)
        end)

        it("treats the trailing slash as significant", function()
            local app = new()
            app:get("/a", function() return "no slash" end)
            app:get("/b/", function() return "slash" end)
            app:get("/c/:x/", function(req) return req.params.x end)
            assert.equal("no slash", call(app, "GET", "/a").body)
            assert.equal(404, call(app, "GET", "/a/").status)
            assert.equal("slash", call(app, "GET", "/b/").body)
            assert.equal(404, call(app, "GET", "/b").status)
            assert.equal("1", call(app, "GET", "/c/1/").body)
            assert.equal(404, call(app, "GET", "/c/1").status)
        end)

        it("gives param names per route, even on a shared trie branch", function()
            local app = new()
            app:get("/o/:id", function(req) return "id=" .. req.params.id end)
            app:get("/o/:oid/items", function(req) return "oid=" .. req.params.oid end)
            assert.equal("id=1", call(app, "GET", "/o/1").body)
            local r = call(app, "GET", "/o/2/items")
            assert.equal("oid=2", r.body)
        end)

        it("supports every method helper, route() and any()", function()
            local app = new()
            for _, m in ipairs({ "get", "post", "put", "patch", "delete", "options", "head" }) do
                app[m](app, "/m", function(req) return m .. ":" .. req.method end)
            end
            app:route({ "GET", "POST" }, "/x", function(req) return "x" .. req.method end)
            app:route("put", "/y", function() return "y" end)
            app:any("/z", function(req) return "z" .. req.method end)
            app:get("/z", function() return "z-get" end)
            for _, m in ipairs({ "GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD" }) do
                assert.equal(string.lower(m) .. ":" .. m, call(app, m, "/m").body)
            end
            assert.equal("xGET", call(app, "GET", "/x").body)
            assert.equal("xPOST", call(app, "POST", "/x").body)
            assert.equal("y", call(app, "PUT", "/y").body)
            assert.equal("zPROPFIND", call(app, "PROPFIND", "/z").body)
            assert.equal("zDELETE", call(app, "DELETE", "/z").body)
            assert.equal("z-get", call(app, "GET", "/z").body)
        end)

        it("any() works on dynamic routes", function()
            local app = new()
            app:any("/api/*", function(req) return req.method .. " " .. req.params["*"] end)
            assert.equal("PATCH v1/x", call(app, "PATCH", "/api/v1/x").body)
        end)

        it("leaves TRACE to routes that name it: any() never takes it", function()
            local app = new()
            app:any("/z", function(req) return "z" .. req.method end)
            app:any("/api/*", function(_req) return "api" end)
            app:get("/g", function() return "g" end)
            app:route({ "GET", "TRACE" }, "/t", function(req) return "t" .. req.method end)
            for _, path in ipairs({ "/z", "/api/x", "/g", "/nowhere" }) do
                local r = call(app, "TRACE", path)
                assert.equal(405, r.status, path)
                assert.is_nil(app:match("TRACE", path), path)
            end
            assert.equal("GET, HEAD", call(app, "TRACE", "/g").headers["allow"])
            assert.is_nil(call(app, "TRACE", "/nowhere").headers["allow"])
            assert.is_nil(call(app, "TRACE", "/z").headers["allow"]:find("TRACE", 1, true))
            assert.equal("tTRACE", call(app, "TRACE", "/t").body)
            assert.equal("/t", app:match("TRACE", "/t"))
        end)

        it("answers 404 with a JSON body when no route matches", function()
            local app = new()
            app:get("/a", function() return "a" end)
            app:get("/p/:x", function() return "p" end)
            for _, path in ipairs({ "/b", "/p", "/p/1/2", "", "*", "http://h/a" }) do
                local r = call(app, "GET", path)
                assert.equal(404, r.status, path)
                assert.same({ error = "not found" }, cjson.decode(r.body))
                assert.equal("application/json", r.headers["content-type"])
            end
        end)

        it("answers 405 with a sorted Allow header including HEAD for GET", function()
            local app = new()
            app:get("/r", function() return "" end)
            app:post("/r", function() return "" end)
            app:delete("/r", function() return "" end)
            local r = call(app, "PUT", "/r")
            assert.equal(405, r.status)
            assert.equal("DELETE, GET, HEAD, POST", r.headers["allow"])
            assert.same({ error = "method not allowed" }, cjson.decode(r.body))
        end)

        it("computes Allow across routes that match the path", function()
            local app = new()
            app:post("/a/new", function() return "" end)
            app:put("/a/:id", function() return "" end)
            app:get("/b/:id", function() return "" end)
            local r = call(app, "PATCH", "/a/new")
            assert.equal(405, r.status)
            assert.equal("POST, PUT", r.headers["allow"])
            assert.equal("PUT", call(app, "PATCH", "/a/1").headers["allow"])
            assert.equal(404, call(app, "PATCH", "/c/1").status)
        end)

        it("answers OPTIONS without a route with 405", function()
            local app = new()
            app:get("/r", function() return "" end)
            local r = call(app, "OPTIONS", "/r")
            assert.equal(405, r.status)
            assert.equal("GET, HEAD", r.headers["allow"])
        end)

        it("falls back from HEAD to GET, unless HEAD has its own route", function()
            local app = new()
            app:get("/g", function(req) return "get " .. req.method end)
            app:get("/p/:x", function(req) return "get " .. req.params.x end)
            app:get("/h", function() return "get" end)
            app:head("/h", function(_req, res) res.headers["x-head"] = "1" end)
            local r = call(app, "HEAD", "/g")
            assert.equal(200, r.status)
            assert.equal("get HEAD", r.body)
            assert.equal("get 1", call(app, "HEAD", "/p/1").body)
            r = call(app, "HEAD", "/h")
            assert.equal("1", r.headers["x-head"])
            assert.is_nil(r.body)
            app:post("/only-post", function() return "" end)
            assert.equal(405, call(app, "HEAD", "/only-post").status)
        end)

        it("match() reports the route and params", function()
            local app = new()
            app:get("/o/:id", function() end)
            local pattern, params = app:match("GET", "/o/a%20b")
            assert.equal("/o/:id", pattern)
            assert.same({ id = "a b" }, params)
            assert.is_nil(app:match("GET", "/x"))
        end)
    end)

    describe("route registration", function()
        local function raises(pattern, fragment, method)
            local app = new()
            local ok, err = pcall(function()
                app:route(method or "GET", pattern, function() end)
            end)
            assert.is_false(ok, pattern)
            assert.truthy(string.find(err, fragment, 1, true), err)
            return err
        end

        it("raises on malformed patterns, naming the pattern", function()
            local err = raises("/a/:", "empty parameter name")
            assert.truthy(string.find(err, '"/a/:"', 1, true), err)
            raises("/a/*/b", "wildcard must be the last segment")
            raises("/a/*x/b", "wildcard must be the last segment")
            raises("/a/:1x", "invalid parameter name")
            raises("/a/:x-y", "invalid parameter name")
            raises("/a/:id/:id", "appears twice")
            raises("a/b", "must start with '/'")
            raises("", "must start with '/'")
            raises("/a", "invalid method", "GE T")
        end)

        it("points the error at the caller's line", function()
            local app = new()
            local ok, err = pcall(function() app:get("/a/:", function() end) end)
            assert.is_false(ok)
            assert.truthy(string.find(err, "app_spec.lua", 1, true), err)
        end)

        it("raises on a duplicate method and pattern", function()
            local app = new()
            app:get("/a", function() end)
            app:get("/o/:id", function() end)
            app:get("/w/*", function() end)
            app:post("/a", function() end) -- another method is fine
            assert.has_error(function() app:get("/a", function() end) end)
            assert.has_error(function() app:route({ "POST", "GET" }, "/a", function() end) end)
            local ok, err = pcall(function() app:get("/o/:oid", function() end) end)
            assert.is_false(ok)
            assert.truthy(string.find(err, "duplicate route GET /o/:oid", 1, true), err)
            assert.has_error(function() app:get("/w/*rest", function() end) end)
            assert.has_error(function() app:route({ "PUT", "PUT" }, "/n", function() end) end)
            -- a failed registration leaves nothing behind
            assert.has_error(function() app:route({ "DELETE", "GET" }, "/a", function() end) end)
            assert.equal(405, call(app, "DELETE", "/a").status)
        end)

        it("raises on a bad handler or method list", function()
            local app = new()
            assert.has_error(function() app:get("/a", "not a function") end)
            assert.has_error(function() app:get(42, function() end) end)
            assert.has_error(function() app:route({}, "/a", function() end) end)
            assert.has_error(function() app:before("x") end)
            assert.has_error(function() app:after(nil) end)
        end)
    end)

    describe("return values", function()
        it("a string is the body, text/plain unless set", function()
            local app = new()
            app:get("/a", function() return "x" end)
            app:get("/b", function(_req, res) res.headers["Content-Type"] = "text/html"; return "<p>" end)
            assert.equal("text/plain; charset=utf-8", call(app, "GET", "/a").headers["content-type"])
            local r = call(app, "GET", "/b")
            assert.equal("text/html", r.headers["content-type"])
            assert.equal("<p>", r.body)
            local n = 0
            for _ in pairs(r.raw_headers) do n = n + 1 end
            assert.equal(1, n)
        end)

        it("a table is encoded as JSON", function()
            local app = new()
            app:get("/j", function() return { message = "hello world" } end)
            app:get("/p", function(_req, res)
                res:set_header("content-type", "application/problem+json")
                return { title = "x" }
            end)
            local r = call(app, "GET", "/j")
            assert.equal(200, r.status)
            assert.equal("application/json", r.headers["content-type"])
            assert.same({ message = "hello world" }, cjson.decode(r.body))
            assert.equal("application/problem+json", call(app, "GET", "/p").headers["content-type"])
        end)

        it("an unencodable table raises", function()
            local app = new()
            app:get("/bad", function() return { f = function() end } end)
            assert.has_error(function() app:handle(raw("GET", "/bad")) end)
        end)

        it("nil means: whatever is in res", function()
            local app = new()
            app:get("/n", function(_req, res)
                res.status = 202
                res.body = "accepted"
                res.headers["X-A"] = "1"
            end)
            app:get("/empty", function() end)
            local r = call(app, "GET", "/n")
            assert.equal(202, r.status)
            assert.equal("accepted", r.body)
            assert.equal("1", r.raw_headers["X-A"])
            assert.is_nil(r.headers["content-type"])
            r = call(app, "GET", "/empty")
            assert.equal(200, r.status)
            assert.is_nil(r.body)
            assert.is_nil(r.raw_headers)
        end)

        it("a status first sets the status", function()
            local app = new()
            app:get("/s", function() return 404, "nope" end)
            app:get("/t", function() return 201, { ok = true } end)
            app:get("/u", function(_req, res) res.body = "kept"; return 204 end)
            local r = call(app, "GET", "/s")
            assert.equal(404, r.status)
            assert.equal("nope", r.body)
            r = call(app, "GET", "/t")
            assert.equal(201, r.status)
            assert.same({ ok = true }, cjson.decode(r.body))
            assert.equal("application/json", r.headers["content-type"])
            r = call(app, "GET", "/u")
            assert.equal(204, r.status)
            assert.equal("kept", r.body)
        end)

        it("returning res itself is the same as nil", function()
            local app = new()
            app:get("/r", function(_req, res) res.body = "b"; return res end)
            assert.equal("b", call(app, "GET", "/r").body)
        end)

        it("other return types raise", function()
            local app = new()
            app:get("/b", function() return true end)
            assert.has_error(function() app:handle(raw("GET", "/b")) end)
        end)

        it("a status outside 100..999 raises", function()
            for _, s in ipairs({ 99, 1000, 200.5, "200" }) do
                local app = new()
                app:get("/s", function(_req, res) res.status = s end)
                assert.has_error(function() app:handle(raw("GET", "/s")) end, nil, tostring(s))
            end
            local app = new()
            app:get("/s", function() return 1000, "x" end)
            assert.has_error(function() app:handle(raw("GET", "/s")) end)
        end)

        it("a non-string body raises, a number is converted", function()
            local app = new()
            app:get("/t", function(_req, res) res.body = { 1 } end)
            app:get("/n", function(_req, res) res.body = 42 end)
            assert.has_error(function() app:handle(raw("GET", "/t")) end)
            assert.equal("42", call(app, "GET", "/n").body)
        end)

        it("errors raised by handlers propagate", function()
            local app = new()
            app:get("/e", function() error("boom") end)
            assert.has_error(function() app:handle(raw("GET", "/e")) end)
            local ok, err = pcall(app.handle, app, raw("GET", "/e"))
            assert.is_false(ok)
            assert.truthy(string.find(err, "boom", 1, true))
        end)

        it("handlers may yield (the core runs them in a coroutine)", function()
            local app = new()
            app:get("/y", function()
                local v = coroutine.yield("waiting")
                return "got " .. v
            end)
            local co = coroutine.create(function() return app:handle(raw("GET", "/y")) end)
            local ok, v = coroutine.resume(co)
            assert.is_true(ok)
            assert.equal("waiting", v)
            local ok2, status, _, body = coroutine.resume(co, "42")
            assert.is_true(ok2)
            assert.equal(200, status)
            assert.equal("got 42", body)
        end)
    end)

    describe("middleware", function()
        it("before runs in order and sees params", function()
            local app = new()
            local seen = {}
            app:before(function(req) seen[#seen + 1] = "1:" .. tostring(req.params.id) end)
            app:before(function(_req) seen[#seen + 1] = "2" end)
            app:get("/o/:id", function() seen[#seen + 1] = "h"; return "ok" end)
            assert.equal("ok", call(app, "GET", "/o/5").body)
            assert.same({ "1:5", "2", "h" }, seen)
        end)

        it("a non-nil return from before short-circuits", function()
            local app = new()
            local handler_ran, second_ran, after_ran = false, false, false
            app:before(function(req, res)
                if not req:header("x-token") then
                    res.status = 401
                    return "no token\n"
                end
            end)
            app:before(function() second_ran = true end)
            app:after(function(_req, res) after_ran = true; res.headers["x-powered-by"] = "wxd" end)
            app:get("/p", function() handler_ran = true; return "secret" end)
            local r = call(app, "GET", "/p")
            assert.equal(401, r.status)
            assert.equal("no token\n", r.body)
            assert.equal("wxd", r.headers["x-powered-by"])
            assert.is_false(handler_ran)
            assert.is_false(second_ran)
            assert.is_true(after_ran)
            r = call(app, "GET", "/p", { headers = { ["x-token"] = "t" } })
            assert.equal(200, r.status)
            assert.equal("secret", r.body)
            assert.is_true(handler_ran)
        end)

        it("before may short-circuit with a status and a table", function()
            local app = new()
            app:before(function() return 429, { error = "slow down" } end)
            app:get("/a", function() return "a" end)
            local r = call(app, "GET", "/a")
            assert.equal(429, r.status)
            assert.same({ error = "slow down" }, cjson.decode(r.body))
        end)

        it("before may answer requests that have no route (e.g. CORS preflight)", function()
            local app = new()
            app:before(function(req)
                if req.method == "OPTIONS" then return 204 end
            end)
            app:get("/a", function() return "a" end)
            assert.equal(204, call(app, "OPTIONS", "/a").status)
            assert.equal(204, call(app, "OPTIONS", "/nowhere").status)
        end)

        it("after runs after the handler, in order, and may change res", function()
            local app = new()
            app:after(function(_req, res) res.body = res.body .. "+1" end)
            app:after(function(_req, res) res.body = res.body .. "+2"; res.status = 203 end)
            app:get("/a", function() return "a" end)
            local r = call(app, "GET", "/a")
            assert.equal("a+1+2", r.body)
            assert.equal(203, r.status)
            assert.equal("text/plain; charset=utf-8", r.headers["content-type"])
        end)

        it("after runs on 404 and 405 too", function()
            local app = new()
            local n = 0
            app:after(function(_req, res) n = n + 1; res.headers["x-n"] = n end)
            app:get("/a", function() return "a" end)
            local r = call(app, "GET", "/nope")
            assert.equal(404, r.status)
            assert.equal("1", r.headers["x-n"])
            r = call(app, "POST", "/a")
            assert.equal(405, r.status)
            assert.equal("2", r.headers["x-n"])
            assert.equal("GET, HEAD", r.headers["allow"])
        end)

        it("ctx carries data from middleware to the handler", function()
            local app = new()
            app:before(function(req) req.ctx.user = "bob" end)
            app:get("/me", function(req) return req.ctx.user end)
            assert.equal("bob", call(app, "GET", "/me").body)
        end)
    end)

    describe("request", function()
        it("exposes the raw fields", function()
            local app = new()
            local got
            app:get("/r", function(req) got = req end)
            app:handle(raw("GET", "/r", { query = "a=1", version = "1.0", body = "b", id = "rid" }))
            assert.equal("GET", got.method)
            assert.equal("/r", got.path)
            assert.equal("a=1", got.query_string)
            assert.equal("1.0", got.http_version)
            assert.equal("b", got.body)
            assert.equal("127.0.0.1", got.remote_addr)
            assert.equal(54321, got.remote_port)
            assert.equal("rid", got.id)
            assert.same({}, got.params)
        end)

        it("looks headers up case-insensitively", function()
            local app = new()
            app:get("/h", function(req)
                return table.concat({
                    req.headers["content-type"], req.headers["Content-Type"],
                    req:header("CONTENT-TYPE"), tostring(req:header("x-missing")),
                }, "|")
            end)
            local r = call(app, "GET", "/h", { headers = { ["content-type"] = "text/x" } })
            assert.equal("text/x|text/x|text/x|nil", r.body)
        end)

        it("copes with a raw request without headers or query", function()
            local app = new()
            app:get("/h", function(req) return tostring(req:header("host")) .. tostring(next(req.query)) end)
            local rq = raw("GET", "/h")
            rq.headers, rq.query = nil, nil
            local status, _, body = app:handle(rq)
            assert.equal(200, status)
            assert.equal("nilnil", body)
        end)

        it("parses the query lazily; last wins and query_all gives all", function()
            local app = new()
            app:get("/q", function(req)
                return { q = req.query, all = req:query_all("a"), none = #req:query_all("zz") }
            end)
            local r = call(app, "GET", "/q", { query = "a=1&b=x+y&a=2&c=%E4%BD%A0&d=%zz&e" })
            local t = cjson.decode(r.body)
            assert.same({ a = "2", b = "x y", c = "你", d = "%zz", e = "" }, t.q)
            assert.same({ "1", "2" }, t.all)
            assert.equal(0, t.none)
        end)

        it("gives an empty query table for an empty query string", function()
            local app = new()
            app:get("/q", function(req) return tostring(next(req.query)) end)
            assert.equal("nil", call(app, "GET", "/q").body)
        end)

        it("req:json() decodes, or returns nil and an error", function()
            local app = new()
            local results = {}
            app:post("/j", function(req)
                results[#results + 1] = { req:json() }
            end)
            call(app, "POST", "/j", { body = '{"a":[1,2]}' })
            call(app, "POST", "/j", { body = "{bad json" })
            call(app, "POST", "/j", { body = "" })
            call(app, "POST", "/j", { body = "42" })
            assert.same({ a = { 1, 2 } }, results[1][1])
            assert.is_nil(results[2][1])
            assert.equal("invalid json", results[2][2])
            assert.is_string(results[2][3])
            assert.same({ nil, "empty body" }, results[3])
            assert.same({ nil, "not a json object or array" }, results[4])
        end)

        it("echoes a JSON body with a 201", function()
            local app = new()
            app:post("/orders", function(req, res) res.status = 201; return req:json() end)
            local r = call(app, "POST", "/orders", { body = '{"sku":"x","n":2}' })
            assert.equal(201, r.status)
            assert.same({ sku = "x", n = 2 }, cjson.decode(r.body))
        end)

        it("req:form() parses urlencoded bodies only", function()
            local app = new()
            local got = {}
            app:post("/f", function(req) got[#got + 1] = { req:form() } end)
            call(app, "POST", "/f", {
                headers = { ["content-type"] = "application/x-www-form-urlencoded; charset=UTF-8" },
                body = "name=a+b&x=%2F&x=2",
            })
            call(app, "POST", "/f", { headers = { ["content-type"] = "application/json" }, body = "{}" })
            call(app, "POST", "/f", { body = "a=1" })
            assert.same({ name = "a b", x = "2" }, got[1][1])
            assert.same({ nil, "not a form" }, got[2])
            assert.same({ nil, "not a form" }, got[3])
        end)
    end)

    describe("response", function()
        it("set_header replaces any spelling; last set wins", function()
            local app = new()
            app:get("/h", function(_req, res)
                res.headers["X-Thing"] = "1"
                res.headers["x-thing"] = "2"
                res:set_header("X-THING", "3")
                res.headers["Content-type"] = "text/a"
                res:set_header("content-type", "text/b")
                return "x"
            end)
            local r = call(app, "GET", "/h")
            local names = {}
            for k in pairs(r.raw_headers) do names[#names + 1] = k end
            table.sort(names)
            assert.same({ "X-THING", "content-type" }, names)
            assert.equal("3", r.raw_headers["X-THING"])
            assert.equal("text/b", r.raw_headers["content-type"])
        end)

        it("reads headers case-insensitively and deletes any spelling with nil", function()
            local app = new()
            app:get("/h", function(_req, res)
                res.headers["X-A"] = "1"
                local v = res.headers["x-a"]
                res.headers["x-a"] = nil
                res.headers["X-B"] = v
            end)
            local r = call(app, "GET", "/h")
            assert.same({ ["X-B"] = "1" }, r.raw_headers)
        end)

        it("accepts a whole headers table and refuses two spellings in it", function()
            local app = new()
            app:get("/ok", function(_req, res) res.headers = { ["X-A"] = "1" }; res.headers["x-a"] = "2" end)
            app:get("/dup", function(_req, res) res.headers = { ["X-A"] = "1", ["x-a"] = "2" } end)
            assert.same({ ["x-a"] = "2" }, call(app, "GET", "/ok").raw_headers)
            assert.has_error(function() app:handle(raw("GET", "/dup")) end)
        end)

        it("converts numbers and keeps arrays (repeated headers)", function()
            local app = new()
            app:get("/h", function(_req, res)
                res.headers["x-n"] = 5
                res:add_header("Set-Cookie", "a=1")
                res:add_header("set-cookie", "b=2")
            end)
            local r = call(app, "GET", "/h")
            assert.equal("5", r.headers["x-n"])
            assert.same({ "a=1", "b=2" }, r.headers["set-cookie"])
        end)

        it("raises on header injection (CR or LF in a value)", function()
            local app = new()
            assert.has_error(function()
                app:get("/a", function(_req, res) res:set_header("x-a", "v\r\nSet-Cookie: evil=1") end)
                app:handle(raw("GET", "/a"))
            end)
            for _, f in ipairs({
                function(_req, res) res.headers["x-b"] = "v\nx" end,
                function(_req, res) res.headers["x-c"] = "ok"; res.headers["x-c"] = "v\rx" end,
                function(_req, res) res.headers = { ["x-d"] = "a\r\nb" } end,
                function(_req, res) res:add_header("x-e", "a\nb") end,
                function(_req, res) res.headers["x-f"] = { "ok", "a\nb" } end,
                function(_req, res) res.headers["bad name"] = "v" end,
                function(_req, res) res.headers["x-g:"] = "v" end,
                function(_req, res) res:redirect("/a\r\nx: y") end,
            }) do
                local a = new()
                a:get("/x", f)
                assert.has_error(function() a:handle(raw("GET", "/x")) end)
            end
        end)

        it("res:json() sets the body and the content type", function()
            local app = new()
            app:get("/j", function(_req, res) res:json({ a = 1 }) end)
            local r = call(app, "GET", "/j")
            assert.equal("application/json", r.headers["content-type"])
            assert.same({ a = 1 }, cjson.decode(r.body))
        end)

        it("res:redirect() defaults to 302 and takes a 3xx status", function()
            local app = new()
            app:get("/a", function(_req, res) return res:redirect("/login") end)
            app:get("/b", function(_req, res) res:redirect("https://example.com/", 301) end)
            app:get("/c", function(_req, res) res:redirect("/x", 200) end)
            local r = call(app, "GET", "/a")
            assert.equal(302, r.status)
            assert.equal("/login", r.headers["location"])
            assert.is_nil(r.body)
            r = call(app, "GET", "/b")
            assert.equal(301, r.status)
            assert.equal("https://example.com/", r.headers["location"])
            assert.has_error(function() app:handle(raw("GET", "/c")) end)
        end)
    end)

    describe("state", function()
        it("does not leak between requests (repeat each)", function()
            local app = new()
            app:get("/a", function(req, res)
                assert.is_nil(rawget(res, "body"))
                assert.equal(200, res.status)
                assert.is_nil(next(res.headers))
                assert.is_nil(next(req.params))
                req.params.x = 1
                res.headers["x-once"] = "1"
                return "a"
            end)
            for _ = 1, 3 do
                local r = call(app, "GET", "/a")
                assert.equal("a", r.body)
                assert.equal("1", r.headers["x-once"])
            end
        end)
    end)
end)
