-- v1 of the order API.
return function(app)
  app:get("/api/orders/:id", function(req)
    return { id = req.params.id, status = "paid", api = "v1" }
  end)
  app:post("/api/orders", function()
    return 201, { id = "1001", api = "v1" }
  end)
end
