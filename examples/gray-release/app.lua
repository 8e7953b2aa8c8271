-- examples/gray-release: v1 and v2 of an order API side by side; the v2
-- group answers the requests wxd.gray colours "v2" (config.lua), for the
-- routes it has, and the app's routes answer the rest.
local wxd = require "wxd"
local gray = require "wxd.gray"
local app = require("wxd.app").new()

require("handlers.orders")(app)
app:group({ gray = "v2" }, function(v2)
  require("handlers.v2.orders")(v2)
end)

-- Which side am I on? (curl -H 'X-OpenID: oSomeone' localhost:8080/whoami)
app:get("/whoami", function(req)
  return { colour = req.gray or "none", openid = req.trace.openid }
end)

-- An upstream per colour. Here both are routes of this app
-- (config.app.recommend_base); a real app names other services.
local base = wxd.config.app.recommend_base
local RECOMMEND = { default = base .. "/internal/recommend/v1", v2 = base .. "/internal/recommend/v2" }
app:get("/recommend", function()
  local url = gray.pick(RECOMMEND)
  -- The call carries X-Wxd-Gray and baggage: wxd-gray=<colour>.
  local res, err = wxd.http.get(url, { timeout = 2 })
  if not res then return 502, { error = err } end
  return res.status, res.body
end)

for _, v in ipairs({ "v1", "v2" }) do
  app:get("/internal/recommend/" .. v, function(req)
    return {
      engine = v, colour_received = req.headers["x-wxd-gray"] or "none",
      baggage = req.headers.baggage or "",
    }
  end)
end

return app
