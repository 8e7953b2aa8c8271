-- The wxd side of spec/bench/mp.sh: an Official Account callback at /wx in
-- safe mode, answering a text message with "echo: <Content>" (the same
-- handler as examples/official-account and the Node peer, spec/bench/mp_node.js).
--
--   MP_TOKEN=... MP_APPID=... MP_AES_KEY=... build/wxd run spec/bench/mp_app --workers 2
--
-- GET /bench/store reports the store that deduplicates messages by MsgId
-- (entries, bytes used, evictions), for the benchmark's summary.
local wxd = require "wxd"
local shdict = require "wxd.shdict"
local app = require("wxd.app").new()

app:mp("/wx", wxd.config.mp, {
  text = function(msg, ctx)
    return ctx.reply.text("echo: " .. msg.Content)
  end,
})

app:get("/health", function() return "ok\n" end)

app:get("/bench/store", function()
  local d = shdict.get_dict("wxd_store")
  if not d then return 404, "no store yet\n" end
  return d:stats()
end)

return app
