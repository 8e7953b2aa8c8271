-- v2 of one route: more detail. POST /api/orders has no v2 yet, so coloured
-- requests still reach v1's.
return function(v2)
  v2:get("/api/orders/:id", function(req)
    return {
      id = req.params.id, status = "paid", api = "v2",
      timeline = { { at = "2026-12-04T00:00:00Z", event = "paid" } },
    }
  end)
end
