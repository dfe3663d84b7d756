module l402proxy/sdk/go

go 1.19
