// Fused output layer + loss (issue 11): placeholder, filled in next.
