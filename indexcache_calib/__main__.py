from indexcache_calib.cli import main

main()
